"""`openkd generate --backend openai` end to end, against the stand-in server (no vLLM)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from openkd.generate.vllm.server import free_port
from tests.conftest import read_jsonl, run_cli, write_jsonl
from tests.helpers import error_line
from tests.standin_openai import StandIn, completion


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn().start()
    yield server
    server.stop()


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Reverse the words: w{i} x{i}"} for i in range(5)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def generate(base_url: str, prompts: Path, out: Path, *extra: str, env: dict | None = None):
    return run_cli(
        "generate", "--teacher", "teacher", "--dataset", prompts, "--output", out,
        "--backend", "openai", "--base-url", base_url, "--max-new-tokens", "32", *extra,
        timeout=120, env=env,
    )  # fmt: skip


def test_labels_through_the_endpoint(standin: StandIn, prompts: Path, tmp_path: Path) -> None:
    standin.echo = True
    standin.script = [completion(finish_reason="stop", prompt_tokens=9, completion_tokens=4)]
    out = tmp_path / "labels.jsonl"
    result = generate(standin.base_url, prompts, out, "--concurrency", "3")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert sorted(r["completion"][0]["content"] for r in rows) == sorted(
        f"Reverse the words: w{i} x{i}" for i in range(5)
    )
    assert {(r["finish_reason"], r["prompt_tokens"], r["completion_tokens"]) for r in rows} == {
        ("stop", 9, 4)
    }
    assert all(req["max_tokens"] == 32 and req["temperature"] == 0.0 for req in standin.requests)


def test_unreachable_endpoint_exits_nonzero_without_output(prompts: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    out = tmp_path / "labels.jsonl"
    result = generate(url, prompts, out)
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert line.startswith(f"error: cannot reach teacher server at {url}: Connection error.")
    assert "or pass --serve" in line
    assert not out.exists()


def test_teacher_name_not_served(standin: StandIn, prompts: Path, tmp_path: Path) -> None:
    standin.models = [{"id": "Qwen/Qwen2.5-0.5B-Instruct"}]
    out = tmp_path / "labels.jsonl"
    result = generate(standin.base_url, prompts, out)
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert line == (
        f"error: teacher 'teacher' is not served at {standin.base_url}; it serves: "
        "Qwen/Qwen2.5-0.5B-Instruct; pass one of them as --teacher (or start the server "
        "with --served-model-name teacher)"
    )
    assert not out.exists() and standin.requests == []


def test_failed_requests_are_reported_and_key_is_not_written(
    standin: StandIn, prompts: Path, tmp_path: Path
) -> None:
    standin.script = [503]
    out = tmp_path / "labels.jsonl"
    result = generate(
        standin.base_url,
        prompts,
        out,
        "--max-retries",
        "0",
        env={"OPENAI_API_KEY": "sk-top-secret"},
    )
    assert result.returncode == 1
    assert "5 of 5 prompts failed" in result.stderr
    failed = read_jsonl(tmp_path / "labels.failed.jsonl")
    assert {row["error"] for row in failed} == {
        "HTTP 503: scripted failure 503 (gave up after 1 attempts)"
    }
    assert standin.headers[-1]["authorization"] == "Bearer sk-top-secret"
    for path in tmp_path.iterdir():
        assert "sk-top-secret" not in path.read_text(errors="replace"), path
    assert "sk-top-secret" not in result.stderr + result.stdout
