"""Drivers shared by the tests: the CLI in this process, and the one-line error it prints.

Test modules import nothing from each other: what several share lives here or in a topic
module beside them (`train_helpers`, `soft_helpers`, `generate_helpers`, ...).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

from tests.soft_helpers import _swap_two_tokens, sharper_copy, swap_two_tokens

__all__ = [
    "Outcome",
    "_swap_two_tokens",
    "error_line",
    "invoke",
    "one_thread",
    "sharper_copy",
    "swap_two_tokens",
    "watch_model_loads",
]


class Outcome(NamedTuple):
    """What a command ended with: `.returncode`/`.stdout`/`.stderr` as from `run_cli`, or
    unpacked as `code, stdout, stderr`."""

    code: int
    stdout: str
    stderr: str

    @property
    def returncode(self) -> int:
        return self.code


def invoke(*args: str | os.PathLike[str], env: dict | None = None) -> Outcome:
    """`openkd ARGS...` through the real entry point, in this process (no interpreter start-up).

    Exit code, stdout and stderr are captured as `run_cli` would; tests that must kill a
    process, or need a fresh one, use `run_cli`.
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
    return Outcome(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block (in this process), as `OMP_NUM_THREADS=1` gives a
    subprocess: the learning proofs' tiny models gain nothing from a second thread, and on CI's
    two workers (one core each) a second one only spins against the other worker."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def error_line(stderr: str, *, last: bool = True, only: bool = False) -> str:
    """The one-line error a failing command printed, asserting there is exactly one and no
    traceback. `last`: it is the final line (a subprocess's children may write after it when
    False); `only`: nothing else was printed (usage errors)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(errors) == 1, stderr[-2000:]
    if last:
        assert lines[-1] == errors[0], stderr[-2000:]
    if only:
        assert lines == errors, stderr[-2000:]
    return errors[0]


def watch_model_loads(monkeypatch: Any, *, weights: bool = False) -> list[str]:
    """Make the ways openkd constructs a model or an engine fail, recording each call: the
    teacher/engine factory (`make_backend`) and eval's transformers loader, and with `weights`
    also transformers' `from_pretrained` for every model class (TRL loads the student so).
    The list stays empty while nothing was constructed."""
    import openkd.generate.backends as backends
    import openkd.generate.backends.transformers as hf_backend

    calls: list[str] = []

    def refuse(name: str) -> Any:
        def constructed(*_args: Any, **_kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called: a model or engine was constructed")

        return constructed

    monkeypatch.setattr(backends, "make_backend", refuse("make_backend"))
    monkeypatch.setattr(hf_backend, "load_causal_lm", refuse("load_causal_lm"))
    if weights:
        from transformers import PreTrainedModel

        loader = refuse("from_pretrained")
        monkeypatch.setattr(
            PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loader(*a, **k))
        )
    return calls
