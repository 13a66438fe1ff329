"""Running the measured programs: one fresh process each, output to a log file, peak memory.

Each run goes through a small wrapper process started fresh for it. Peak RSS comes from its
`getrusage(RUSAGE_CHILDREN)`: the measured program's own high-water mark (the largest of it and
the children it waited for), not a sample and not polluted by earlier runs. RSS also counts
file-backed pages, such as a memory-mapped Arrow dataset the program read through, which the
kernel can drop at any time and which grow with the file on disk, not with the program's state.
So the wrapper also samples the program's /proc/<pid>/status every 10 ms: the peak of RssAnon
(memory the process allocated itself: heap, stacks, private copies) and of RssFile (file-backed
pages mapped in), for the program's own process (children it starts are not included).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

console = Console(stderr=True, highlight=False)

_WRAPPER = """\
import json, resource, subprocess, sys, time
stats, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
peak = {"RssAnon:": 0, "RssFile:": 0}

def sample(pid):
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                key = line[:8].decode()
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
    except (OSError, ValueError, IndexError):
        pass

t0 = time.perf_counter()
with open(log, "ab") as fh:
    child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    while child.poll() is None:
        sample(child.pid)
        time.sleep(0.01)
    code = child.returncode
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(stats, "w") as fh:
    json.dump({"returncode": code, "wall_seconds": wall, "max_rss_kib": usage.ru_maxrss,
               "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "max_anon_kib": peak["RssAnon:"], "max_file_kib": peak["RssFile:"]}, fh)
"""


class BenchError(Exception):
    """A measured program failed; the message names it and quotes the end of its log."""


@dataclass(frozen=True)
class Measured:
    wall_seconds: float
    cpu_seconds: float  # user + system, of the program and the children it waited for
    max_rss_mib: float
    log: Path
    # Peaks of the program's own process, sampled every 10 ms (0 where /proc has no status).
    max_anon_mib: float = 0.0  # RssAnon: memory it allocated itself
    max_file_mib: float = 0.0  # RssFile: file-backed pages mapped in (page cache)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(tail[-lines:])


def openkd_command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "openkd", *map(str, args)]


def python_module(module: str, *args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run(
    cmd: Sequence[str],
    *,
    log: Path,
    env: dict[str, str],
    label: str,
    timeout: float = 900,
    cwd: Path | None = None,
) -> Measured:
    """Run `cmd` to completion in a fresh wrapper process; BenchError if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n", encoding="utf-8")
    stats = log.with_suffix(".rusage.json")
    stats.unlink(missing_ok=True)
    wrapper = [sys.executable, "-c", _WRAPPER, str(stats), str(log), *map(str, cmd)]
    t0 = time.monotonic()
    with console.status(f"  {label}") as status:
        proc = subprocess.Popen(wrapper, env=env, cwd=cwd, start_new_session=True)
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - t0
                if elapsed > timeout:
                    raise BenchError(f"{label} took longer than {timeout:.0f} s (log: {log})")
                status.update(f"  {label}: {elapsed:.0f} s")
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                stop_group(proc)
    if not stats.exists():
        raise BenchError(f"{label} was killed (log: {log})")
    result = json.loads(stats.read_text())
    if result["returncode"] != 0:
        raise BenchError(
            f"{label} exited with code {result['returncode']} (log: {log}):\n{log_tail(log)}"
        )
    measured = Measured(
        result["wall_seconds"],
        result["cpu_seconds"],
        result["max_rss_kib"] / 1024,
        log,
        max_anon_mib=result["max_anon_kib"] / 1024,
        max_file_mib=result["max_file_kib"] / 1024,
    )
    console.print(
        f"  {label}: {measured.wall_seconds:.1f} s (CPU {measured.cpu_seconds:.1f} s, "
        f"peak RSS {measured.max_rss_mib:,.0f} MiB, anon {measured.max_anon_mib:,.0f} MiB, "
        f"file {measured.max_file_mib:,.0f} MiB)"
    )
    return measured


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def background(
    cmd: Sequence[str], *, log: Path, env: dict[str, str], cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """A server for the length of a `with` block, stopped with all its children afterwards."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def wait_healthy(
    url: str,
    proc: subprocess.Popen,
    *,
    log: Path,
    timeout: float,
    what: str = "the vLLM server",
) -> float:
    """Seconds until `url` answers 200; BenchError if the server dies or never gets there."""
    import httpx

    t0 = time.monotonic()
    with console.status(f"  starting {what}") as status:
        while True:
            elapsed = time.monotonic() - t0
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=5).status_code == 200:
                    return elapsed
            if proc.poll() is not None:
                raise BenchError(f"{what} exited while starting (log: {log}):\n{log_tail(log)}")
            if elapsed > timeout:
                raise BenchError(f"{what} was not healthy after {timeout:.0f} s (log: {log})")
            status.update(f"  starting {what}: {elapsed:.0f} s")
            time.sleep(0.5)
