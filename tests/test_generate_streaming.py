"""Stage 1 streams: the teacher is never held up by a slow answer, each answer reaches the disk
within `--commit-interval`, a dead teacher stops the run without losing work, and a full disk
is one clean error. Teachers here are the stand-in OpenAI server (answer times chosen per
prompt, so answers finish out of order) and the mock with its latency model.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from openkd.tiny import make_prompts
from tests.conftest import read_jsonl, write_jsonl
from tests.generate_helpers import generate
from tests.helpers import error_line, invoke
from tests.standin_openai import StandIn


def heavy_tail(prompt: str) -> float:
    """Answer time from the prompt: most answers are quick, one in eight takes 20x longer."""
    h = zlib.crc32(prompt.encode())
    return 0.6 if h % 8 == 0 else 0.03 * (1 + h % 3)


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn(echo=True).start()
    yield server
    server.stop()


def openai_args(base_url: str, *extra: str) -> list[str]:
    return [
        "generate", "--backend", "openai", "--base-url", base_url, "--teacher", "teacher",
        "--max-new-tokens", "32", *extra,
    ]  # fmt: skip


def popen_openkd(*args: str | os.PathLike[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "openkd", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def prompts_of(path: Path) -> list[str]:
    return [row["prompt"][-1]["content"] for row in read_jsonl(path)] if path.exists() else []


def canon(path: Path) -> list[str]:
    return sorted(json.dumps(row, sort_keys=True) for row in read_jsonl(path))


@pytest.mark.slow
def test_sigkill_keeps_every_answer_older_than_the_commit_interval(standin, tmp_path):
    standin.latency_of = heavy_tail
    prompts = [f"Reverse the words: item {i} of the list" for i in range(600)]
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "killed" / "t.jsonl"
    interval = 0.3
    args = openai_args(standin.base_url, "--dataset", dataset, "--output", out)
    proc = popen_openkd(*args, "--concurrency", "32", "--commit-interval", str(interval))
    deadline = time.monotonic() + 120
    while len(standin.answered) < 150 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()}"
    killed_at = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    on_disk = prompts_of(out)
    assert len(on_disk) == len(set(on_disk)) < 600
    # Every answer the server sent more than one commit interval before the kill is on disk
    # (plus a second for the client to receive and sort it on a busy CI machine).
    old = {p for t, p in standin.answered if t < killed_at - interval - 1.0}
    assert old, "nothing was answered early enough to check"
    assert old <= set(on_disk), f"{len(old - set(on_disk))} old answers were lost"
    # The answers finished out of order and were written in that order, not the dataset's.
    order = [prompts.index(p) for p in on_disk]
    assert order != sorted(order)

    resumed = invoke(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(on_disk):,} rows already in t.jsonl are skipped" in resumed.stderr
    clean = tmp_path / "clean" / "t.jsonl"
    assert (
        invoke(*openai_args(standin.base_url, "--dataset", dataset, "--output", clean)).returncode
        == 0
    )
    assert canon(out) == canon(clean)
    assert len(prompts_of(out)) == 600


def test_no_batch_barrier_other_prompts_flow_around_a_slow_answer(standin, tmp_path):
    slow = "Reverse the words: the very slow one"
    standin.latency_of = lambda prompt: 3.0 if prompt == slow else 0.02
    prompts = [slow] + [f"Reverse the words: quick {i}" for i in range(60)]
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "t.jsonl"
    args = openai_args(standin.base_url, "--dataset", dataset, "--output", out)
    result = invoke(*args, "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    assert standin.max_in_flight <= 4
    slow_done = next(t for t, p in standin.answered if p == slow)
    # While the slow answer ran, its three neighbours' slots were refilled again and again: the
    # quick prompts were sent (and written) before it finished; a batch of 4 would have let 3 by.
    # (All 60 need 0.4 s of the slow answer's 3 s; 40 leaves room for a busy CI machine.)
    assert sum(t < slow_done for t, p in standin.arrived if p != slow) >= 40
    assert prompts_of(out).index(slow) >= 40  # written when it landed, not when it was sent


@pytest.mark.slow
def test_a_dead_teacher_stops_the_run_keeps_its_work_and_a_rerun_completes(standin, tmp_path):
    standin.latency = 0.05
    prompts = [f"Reverse the words: row {i} here" for i in range(300)]
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "t.jsonl"
    args = openai_args(standin.base_url, "--dataset", dataset, "--output", out)
    proc = popen_openkd(*args, "--concurrency", "8", "--max-retries", "1")
    deadline = time.monotonic() + 120
    while len(standin.answered) < 60 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    standin.kill()
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 30, "the run should stop soon after the teacher died"
    assert proc.returncode == 1, stderr
    last = error_line(stderr)
    assert last.startswith("error: the teacher server at ") and "stopped answering" in last
    assert "rerun the same command to continue" in last
    kept = prompts_of(out)
    assert 60 <= len(kept) < 300
    # The prompts it could not send are not failures: no 240-row failed file.
    failed = tmp_path / "t.failed.jsonl"
    assert not failed.exists() or len(read_jsonl(failed)) < 8
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["status"] == "stopped"

    revived = StandIn(echo=True).start()
    try:
        rerun = invoke(*openai_args(revived.base_url, "--dataset", dataset, "--output", out))
    finally:
        revived.stop()
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(prompts_of(out)) == sorted(prompts)
    assert not failed.exists()


def test_mock_latency_answers_land_in_finish_order(tmp_path):
    long = "Reverse the words: " + " ".join(f"w{i}" for i in range(40))
    rows = [{"prompt": long}] + [{"prompt": p} for p in make_prompts(20)]
    dataset = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "t.jsonl"
    proc = generate(dataset, out, "--mock-latency", "0.01", "--concurrency", "8")
    assert proc.returncode == 0, proc.stderr
    written = read_jsonl(out)
    assert len(written) == 21
    assert written[-1]["prompt"][-1]["content"] == long  # first sent, last written
    assert "keeping 8 requests in flight" in proc.stderr


class FullDisk:
    """A row file that takes `room` bytes, then fails like a full disk."""

    def __init__(self, fh, room: list[int]) -> None:
        self._fh, self._room = fh, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room[0]:
            self._fh.write(data[: self._room[0]])  # a partial write, as on a real full disk
            self._room[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room[0] -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def test_disk_full_is_one_line_and_a_rerun_repairs_and_completes(tmp_path, monkeypatch):
    from openkd.generate import writer

    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(400)])
    out = tmp_path / "t.jsonl"
    room = [20_000]
    real_handle = writer.OutputWriter._handle

    def filling(self, kind):
        return FullDisk(real_handle(self, kind), room)

    monkeypatch.setattr(writer.OutputWriter, "_handle", filling)
    args = ("--mock-latency", "0.004", "--concurrency", "4", "--commit-interval", "0.05")
    proc = generate(dataset, out, *args)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: disk full writing {out} (")
    assert "free on its file system); free some space or pass --output on another disk" in last
    assert "rerun the same command to continue" in last
    assert "Traceback" not in proc.stderr
    assert 0 < out.stat().st_size <= 20_000

    monkeypatch.undo()
    again = generate(dataset, out)
    assert again.returncode == 0, again.stderr
    assert (
        "bytes of a torn last line (an earlier run was killed or ran out of disk)" in again.stderr
    )
    clean = tmp_path / "clean.jsonl"
    assert generate(dataset, clean).returncode == 0
    assert canon(out) == canon(clean)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_then_more_room_completes_the_run(small_tmpfs, tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(3000)])
    out = small_tmpfs / "t.jsonl"
    proc = generate(dataset, out)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: disk full writing {small_tmpfs}/t.")
    assert "free on its file system" in last and "Traceback" not in proc.stderr

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    again = generate(dataset, out)
    assert again.returncode == 0, again.stderr
    clean = tmp_path / "clean.jsonl"
    assert generate(dataset, clean).returncode == 0
    assert canon(out) == canon(clean)
