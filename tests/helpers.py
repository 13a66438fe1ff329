"""Drivers shared by the tests: the CLI in this process, and the one-line error it prints."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys


def invoke(*args: str | os.PathLike[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`openkd ARGS...` through the real entry point, in this process (no interpreter start-up).

    Exit code, stdout and stderr are captured as `run_cli` would; the one test that must kill
    a process uses a subprocess.
    """
    from openkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in env or {}}
    saved_argv = sys.argv
    os.environ.update(env or {})
    sys.argv = ["openkd", *map(str, args)]
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    code = 0 if code is None else code
    assert isinstance(code, int), code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def error_line(stderr: str) -> str:
    """The one-line error a failing command ends with (asserting there is one)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[-1]
