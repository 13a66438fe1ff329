"""`--serve`'s child-process handling, with a stand-in server script instead of vLLM.

The stand-in behaves like the vLLM server where it matters here: it serves /health, has a
child of its own (vLLM's engine core), and on SIGTERM stops that child before exiting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from openkd.errors import ConfigError, OpenkdError
from openkd.generate.backends.spec import teacher_spec
from openkd.generate.config import GenerateConfig
from openkd.generate.vllm.server import (
    ManagedServer,
    check_port_free,
    free_port,
    group_members,
    last_meaningful_line,
    vllm_server_command,
)

STANDIN = textwrap.dedent(
    """
    import http.server, signal, subprocess, sys, time
    mode, port = sys.argv[1], int(sys.argv[2])
    print("standin: starting", flush=True)
    if mode == "die":
        print("Traceback (most recent call last):", flush=True)
        print('  File "x.py", line 1, in <module>', flush=True)
        print("(EngineCore pid=42) ValueError: the model is bad", flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        sys.exit(3)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    def on_term(signum, frame):
        if mode == "ignore-term":
            return
        engine.terminate()
        engine.wait()
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    if mode == "never-healthy":
        while True:
            time.sleep(1)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """
)


@pytest.fixture(scope="module")
def standin_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("standin") / "standin_server.py"
    path.write_text(STANDIN)
    return path


def make_server(script: Path, log: Path, mode: str = "ok", **kwargs) -> ManagedServer:
    port = free_port()
    return ManagedServer(
        [sys.executable, str(script), mode, str(port)],
        health_url=f"http://127.0.0.1:{port}/health",
        log_path=log,
        name="stand-in server",
        **kwargs,
    )


def wait_group_gone(pgid: int, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while (members := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return members


def test_start_then_stop_leaves_no_process(standin_script: Path, tmp_path: Path) -> None:
    server = make_server(standin_script, tmp_path / "s.server.log")
    server.start(timeout=30)
    pid = server.pid
    assert pid is not None and len(group_members(pid)) == 2  # server + its "engine"
    server.stop()
    server.stop()  # idempotent
    assert group_members(pid) == []
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert f"stand-in server pid {pid}" in (tmp_path / "s.server.log").read_text()


def test_exception_inside_the_run_still_stops_everything(
    standin_script: Path, tmp_path: Path
) -> None:
    server = make_server(standin_script, tmp_path / "s.server.log")
    with pytest.raises(RuntimeError, match="run failed"), server:
        server.start(timeout=30)
        pid = server.pid
        raise RuntimeError("run failed")
    assert group_members(pid) == []


@pytest.mark.slow
def test_server_that_ignores_sigterm_is_killed(standin_script: Path, tmp_path: Path) -> None:
    server = make_server(standin_script, tmp_path / "s.log", "ignore-term", stop_timeout=1.0)
    server.start(timeout=30)
    pid = server.pid
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 10
    assert group_members(pid) == []


def test_dying_server_quotes_root_cause_and_log(standin_script: Path, tmp_path: Path) -> None:
    log = tmp_path / "out.server.log"
    server = make_server(standin_script, log, "die")
    with pytest.raises(OpenkdError) as info:
        server.start(timeout=30)
    message = str(info.value)
    assert message == (
        f"stand-in server exited with code 3 while starting: ValueError: the model is bad "
        f"(full log: {log})"
    )
    assert server.pid is None  # stopped and forgotten


def test_never_healthy_times_out_and_is_stopped(standin_script: Path, tmp_path: Path) -> None:
    server = make_server(standin_script, tmp_path / "s.log", "never-healthy")
    t0 = time.monotonic()
    with pytest.raises(OpenkdError, match=r"was not healthy after 2 s \(--serve-timeout\)"):
        server.start(timeout=2)
    assert time.monotonic() - t0 < 15
    # The whole group is gone: nothing matching our script is left running.
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(standin_script) in " ".join(p.info["cmdline"] or [])
    ]
    assert left == []


PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from openkd.generate.vllm.server import ManagedServer
    script, port, log = sys.argv[1], sys.argv[2], sys.argv[3]
    server = ManagedServer([sys.executable, script, "ok", port],
                           health_url=f"http://127.0.0.1:{port}/health", log_path=Path(log))
    try:
        with server:
            server.start(timeout=30)
            print(server.pid, flush=True)
            time.sleep(600)
    except KeyboardInterrupt:
        print("stopped by handler", flush=True)
        sys.exit(130)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_parent_takes_the_server_down(
    standin_script: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM (Slurm, `kill`): handlers stop it. SIGKILL: the kernel's parent-death signal."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(standin_script), str(free_port()), str(tmp_path / "l")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        pid = int(parent.stdout.readline())
        assert len(group_members(pid)) == 2
        os.kill(parent.pid, sig)
        rest, _ = parent.communicate(timeout=30)
        assert wait_group_gone(pid) == []
        if sig == signal.SIGTERM:  # unwound through the context manager, not just killed
            assert rest.strip() == "stopped by handler" and parent.returncode == 130
    finally:
        if parent.poll() is None:
            parent.kill()


def test_vllm_command_carries_every_engine_setting(tmp_path: Path) -> None:
    cfg = GenerateConfig(
        teacher="org/teacher",
        dataset="d.jsonl",
        backend="openai",
        serve=True,
        output=tmp_path / "labels.jsonl",
        tensor_parallel_size=2,
        data_parallel_size=4,
        dtype="bfloat16",
        max_model_len=8192,
        gpu_memory_utilization=0.85,
        max_num_seqs=128,
        enforce_eager=True,
        revision="abc123",
        seed=7,
        serve_args=["--kv-cache-dtype fp8", "--max-model-len=4096"],
    )
    cmd = vllm_server_command(teacher_spec(cfg), 8123)
    # `vllm serve` (one API server per replica by default), vLLM's command line as a module.
    assert cmd[:5] == [sys.executable, "-m", "openkd.generate.vllm.cli", "serve", "org/teacher"]
    line = " ".join(cmd[5:])
    for expected in (
        "--served-model-name org/teacher",
        "--host 127.0.0.1 --port 8123",
        "--tensor-parallel-size 2",
        "--data-parallel-size 4",
        "--dtype bfloat16",
        "--max-model-len 8192",
        "--gpu-memory-utilization 0.85",
        "--max-num-seqs 128",
        "--enforce-eager",
        "--no-trust-remote-code",
        "--revision abc123",
        "--seed 7",
    ):
        assert expected in line
    # User extras come last (so they win) and are split like a shell would.
    assert cmd[-3:] == ["--kv-cache-dtype", "fp8", "--max-model-len=4096"]
    assert teacher_spec(cfg).server_log == tmp_path / "labels.server.log"
    sharded = cfg.model_copy(update={"shard": "1/4"})
    assert teacher_spec(sharded).server_log == tmp_path / "labels.shard-1-of-4.server.log"
    assert "--trust-remote-code" in vllm_server_command(
        teacher_spec(cfg.model_copy(update={"trust_remote_code": True})), 1
    )


def test_last_meaningful_line_prefers_the_root_cause() -> None:
    log = textwrap.dedent(
        """
        INFO 11-23 18:19:38 [api_server.py:1] vLLM API server version 0.32.0
        (EngineCore pid=5644) ERROR 11-23 [core.py:1] EngineCore failed to start.
        (EngineCore pid=5644) Traceback (most recent call last):
        (EngineCore pid=5644)   File "core.py", line 10, in run
        (EngineCore pid=5644) ValueError: To serve at least one request with the models's max seq len (131072), 16.0 GiB KV cache is needed
        Traceback (most recent call last):
          File "api_server.py", line 5, in <module>
        RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
        """
    )
    assert last_meaningful_line(log).startswith("ValueError: To serve at least one request")
    worker = textwrap.dedent(
        """
        (VllmWorker-0 pid=22812) ERROR 11-23 18:44:28 [multiproc_executor.py:953]     raise ValueError(
        (VllmWorker-0 pid=22812) ERROR 11-23 18:44:28 [multiproc_executor.py:953] ValueError: Available memory on node 0 (7.93/12.34 GiB) is less than desired
        (EngineCore pid=22624) ERROR 11-23 18:44:33 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
        Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
        RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
        """
    )
    assert last_meaningful_line(worker) == (
        "ValueError: Available memory on node 0 (7.93/12.34 GiB) is less than desired"
    )
    assert len(last_meaningful_line("RuntimeError: " + "x" * 2000)) == 500
    usage = "usage: api_server.py [-h]\napi_server.py: error: unrecognized arguments: --nope\n"
    assert last_meaningful_line(usage) == "api_server.py: error: unrecognized arguments: --nope"
    assert last_meaningful_line("\x1b[31mKilled\x1b[0m\n\n") == "Killed"


def test_busy_serve_port_is_refused_before_starting() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--serve-port {port} is in use"):
            check_port_free(port)
    check_port_free(port)  # free again once closed
