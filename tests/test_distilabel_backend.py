"""`--backend distilabel` with real distilabel LLM classes, offline.

`OpenAILLM` talks to a small OpenAI-compatible server started here on 127.0.0.1; a custom
synchronous `LLM` subclass, defined below and loaded by dotted path, covers the other path.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from openkd.config import resolve
from openkd.errors import OpenkdError
from openkd.generate.config import GenerateConfig
from openkd.generate.run import run
from openkd.tiny import make_prompts
from openkd.tiny.tasks import reverse_words
from tests.conftest import read_jsonl, run_cli, write_jsonl
from tests.helpers import error_line

SECRET = "sk-secret-distilabel"


class StandIn(ThreadingHTTPServer):
    """Answers /v1/chat/completions by the reverse rule, honouring max_tokens; 400 on 'FAILME'."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.auth: set[str] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.server.auth.add(self.headers.get("Authorization", ""))
        prompt = body["messages"][-1]["content"]
        if "FAILME" in prompt:
            return self._send(400, {"error": {"message": "prompt rejected", "type": "invalid"}})
        words = reverse_words(prompt).split()
        cut = words[: body["max_tokens"]]
        finish = "length" if len(cut) < len(words) else "stop"
        self._send(
            200,
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(cut)},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(cut),
                    "total_tokens": len(prompt.split()) + len(cut),
                },
            },
        )

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = StandIn()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cfg(dataset: Path, out: Path, **extra: Any) -> GenerateConfig:
    values = {
        "backend": "distilabel",
        "teacher": "stand-in-teacher",
        "dataset": str(dataset),
        "output": out,
        "concurrency": 8,
        **extra,
    }
    return resolve(GenerateConfig, None, values)


@pytest.fixture
def dataset(tmp_path) -> Path:
    rows = [{"prompt": p} for p in make_prompts(20, max_words=6)]
    rows.append({"prompt": "Reverse the words: FAILME now"})
    return write_jsonl(tmp_path / "p.jsonl", rows)


def test_openai_llm_labels_filters_truncation_and_isolates_a_bad_prompt(
    server, dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "out" / "t.jsonl"
    cfg = _cfg(
        dataset,
        out,
        llm_class="distilabel.models.OpenAILLM",
        base_url=server.base_url,
        max_new_tokens=5,
        max_retries=0,
    )
    with pytest.raises(OpenkdError, match=r"1 of 21 prompts failed"):
        run(cfg)

    kept = read_jsonl(out)
    aside = read_jsonl(out.with_name("t.truncated.jsonl"))
    assert len(kept) + len(aside) == 20
    for row in kept:
        assert row["completion"][0]["content"] == reverse_words(row["prompt"][-1]["content"])
        assert row["finish_reason"] == "stop" and row["completion_tokens"] < 5
    # No finish reason in distilabel's output: 5 of 5 tokens used means cut.
    assert aside and all(
        r["finish_reason"] == "length" and r["completion_tokens"] == 5 for r in aside
    )
    (failed,) = read_jsonl(out.with_name("t.failed.jsonl"))
    assert "FAILME" in failed["prompt"][-1]["content"] and "BadRequestError" in failed["error"]

    # Greedy settings were sent explicitly on every request, the seed via extra_body.
    assert len(server.requests) == 21
    for body in server.requests:
        assert body["temperature"] == 0.0 and body["max_tokens"] == 5 and body["seed"] == 0
        assert body["model"] == "stand-in-teacher"
    assert server.auth == {f"Bearer {SECRET}"}
    meta = json.loads(out.with_name("t.meta.json").read_text())
    assert meta["teacher"]["llm_class"] == "distilabel.models.OpenAILLM"
    assert meta["versions"]["distilabel"] and meta["versions"]["openai"]
    for path in out.parent.iterdir():
        assert SECRET not in path.read_bytes().decode("utf-8", errors="replace"), path.name


def test_server_down_is_a_failure_per_prompt_and_a_rerun_recovers(
    server, dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "t.jsonl"
    common = {"llm_class": "distilabel.models.OpenAILLM", "max_retries": 0, "max_new_tokens": 64}
    with pytest.raises(OpenkdError, match=r"21 of 21 prompts failed .* rerun the same command"):
        run(_cfg(dataset, out, base_url=f"http://127.0.0.1:{_free_port()}/v1", **common))
    failures = read_jsonl(tmp_path / "t.failed.jsonl")
    assert len(failures) == 21 and all("APIConnectionError" in f["error"] for f in failures)
    assert not out.exists() or read_jsonl(out) == []

    with pytest.raises(OpenkdError, match=r"1 of 21 prompts failed"):
        run(_cfg(dataset, out, base_url=server.base_url, **common))
    assert len(read_jsonl(out)) == 20
    assert [f["prompt"][-1]["content"] for f in read_jsonl(tmp_path / "t.failed.jsonl")] == [
        "Reverse the words: FAILME now"
    ]


def __getattr__(name: str) -> Any:
    """`RuleLLM`, built on first use so collecting this module does not import distilabel."""
    if name != "RuleLLM":
        raise AttributeError(name)
    from distilabel.models.llms.base import LLM

    class RuleLLM(LLM):
        """A synchronous distilabel LLM: reverse rule, `None` generation for 'NONE' prompts."""

        suffix: str = ""

        @property
        def model_name(self) -> str:
            return "rule"

        def load(self) -> None:
            super().load()

        def generate(self, inputs, num_generations=1, max_new_tokens=128, temperature=1.0):
            assert temperature == 0.0
            outputs = []
            for conversation in inputs:
                prompt = conversation[-1]["content"]
                text = None if "NONE" in prompt else reverse_words(prompt) + self.suffix
                outputs.append(
                    {
                        "generations": [text],
                        "statistics": {"input_tokens": [1], "output_tokens": [2]},
                    }
                )
            return outputs

    globals()["RuleLLM"] = RuleLLM
    return RuleLLM


def test_custom_llm_class_by_dotted_path_with_llm_kwargs(tmp_path, capsys):
    rows = [{"prompt": p} for p in make_prompts(6)] + [{"prompt": "Reverse the words: NONE"}]
    dataset = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "t.jsonl"
    cfg = _cfg(
        dataset,
        out,
        llm_class="tests.test_distilabel_backend:RuleLLM",
        llm_kwargs={"suffix": " !"},
    )
    with pytest.raises(OpenkdError, match=r"1 of 7 prompts failed"):
        run(cfg)
    assert "takes no top_p" not in capsys.readouterr().err
    labelled = read_jsonl(out)
    assert len(labelled) == 6
    assert all(r["completion"][0]["content"].endswith(" !") for r in labelled)
    (failed,) = read_jsonl(tmp_path / "t.failed.jsonl")
    assert "generation=None" in failed["error"]


@pytest.mark.parametrize(
    "llm_class,message",
    [
        ("distilabel.models.vLLM", r"does not work with vLLM's V1 engine; use --backend vllm"),
        ("distilabel.models.llms.vllm:vLLM", r"use --backend vllm"),
        ("distilabel.models.NoSuchLLM", r"is not a distilabel LLM class"),
        ("no_such_package.Model", r"cannot import no_such_package"),
    ],
)
def test_unusable_llm_class_is_one_line_error(tmp_path, llm_class, message):
    import re

    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    proc = run_cli(
        "generate", "--backend", "distilabel", "--llm-class", llm_class, "--teacher", "t",
        "--dataset", dataset, "--output", tmp_path / "t.jsonl",
    )  # fmt: skip
    assert proc.returncode == 1
    last = error_line(proc.stderr)
    assert last.startswith("error: --llm-class") and re.search(message, last), proc.stderr
