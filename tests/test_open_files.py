"""Every request in flight holds a socket: the openai client raises its open-file limit, caps
its window to what still fits (one line), and reports running out of files as a local limit,
never as a dead server. openkd runs under a low limit (as a Slurm job inherits one) against the
stand-in server.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, write_jsonl
from tests.standin_openai import StandIn

PROMPTS = 300


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn(echo=True, latency=0.3, backlog=1024).start()  # 300 connections at once
    yield server
    server.stop()


def under_limit(soft: int, hard: int, args: list[str], timeout: float = 120):
    """`python ARGS...` with RLIMIT_NOFILE set to (soft, hard) before it starts."""
    limit = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    return subprocess.run(
        [sys.executable, "-c", limit, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parent.parent,
    )


def generate_under(soft: int, hard: int, standin: StandIn, tmp_path: Path):
    dataset = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"Reverse the words: a{i} b{i}"} for i in range(PROMPTS)]
    )
    out = tmp_path / "t.jsonl"
    args = [
        "-m", "openkd", "generate", "--backend", "openai", "--base-url", standin.base_url,
        "--teacher", "teacher", "--dataset", str(dataset), "--output", str(out),
        "--concurrency", str(PROMPTS), "--max-retries", "0",
    ]  # fmt: skip
    return under_limit(soft, hard, args), out


@pytest.mark.slow
def test_a_low_hard_limit_caps_the_window_with_one_line(standin, tmp_path) -> None:
    result, out = generate_under(128, 128, standin, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(out)) == PROMPTS  # not a single "Connection error"
    [line] = [x for x in result.stderr.splitlines() if "ulimit -n" in x]
    assert line.startswith("warning: the open-file limit (`ulimit -n`) is 128 (hard limit 128)")
    kept = int(line.split("; keeping ")[1].split()[0])
    assert f"not {PROMPTS}; keeping {kept} requests in flight" in line
    assert 1 <= kept < 128 and standin.max_in_flight <= kept
    assert f"keeping {kept} requests in flight" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_the_soft_limit_is_raised_to_the_hard_one(standin, tmp_path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit here is {hard}")
    result, out = generate_under(128, hard, standin, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ulimit -n" not in result.stderr
    assert len(read_jsonl(out)) == PROMPTS
    assert standin.max_in_flight > 128  # more sockets at once than the soft limit it started with


EXHAUSTED = textwrap.dedent(
    """
    import os, sys
    from openkd.errors import OpenkdError
    from openkd.generate.backends.base import Sampling, TeacherUnavailable, answer_in_order
    from openkd.generate.backends.openai import OpenAIBackend
    from openkd.generate.backends.spec import teacher_spec
    from openkd.generate.config import GenerateConfig

    cfg = GenerateConfig(teacher="teacher", dataset="d.jsonl", backend="openai",
                         base_url=sys.argv[1], max_retries=2, concurrency=8)
    backend = OpenAIBackend(teacher_spec(cfg))
    backend.retry_base_delay = 0.001
    conversation = [{"role": "user", "content": "Reverse the words: a b"}]
    with backend:
        answer_in_order(backend, [conversation], Sampling())  # everything imported
        hog = []
        try:
            while True:  # take every descriptor left: new sockets fail with EMFILE
                hog.append(open(os.devnull))
        except OSError:
            pass
        try:
            answers = answer_in_order(backend, [conversation] * 16, Sampling())
            print("finished:", [a.error for a in answers])
        except TeacherUnavailable as err:
            print("dead server:", err)
        except OpenkdError as err:
            print("error:", err)
        finally:
            for f in hog:
                f.close()
    """
)


def test_running_out_of_files_is_a_local_error_not_a_dead_server(standin, tmp_path) -> None:
    standin.latency = 0.0
    result = under_limit(256, 256, ["-c", EXHAUSTED, standin.base_url], timeout=60)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith("error: openkd ran out of open files ([Errno 24] Too many open files)")
    assert (
        "(`ulimit -n` is 256), not a dead server: raise `ulimit -n` or lower --concurrency" in line
    )
    assert "stopped answering" not in result.stdout
