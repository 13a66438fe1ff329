"""If vLLM rejects a whole `chat` call, only the prompts it rejects fail; a dead engine stops.

The engine is a stand-in here (its `chat` raises like vLLM's validation does); the real
engine's answers are covered by tests/test_vllm_engines.py.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from openkd.errors import OpenkdError
from openkd.generate.backends.base import Sampling
from openkd.generate.backends.vllm import VLLMBackend
from openkd.generate.config import GenerateConfig


class StubEngine:
    """Answers like vLLM's `LLM.chat`, raising for the whole call if any prompt is 'BAD'."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.error = error

    def chat(self, conversations, params, use_tqdm=False):
        self.calls.append(len(conversations))
        if self.error is not None:
            raise self.error
        if any(c[-1]["content"] == "BAD" for c in conversations):
            raise ValueError("prompt rejected by validation")
        return [
            SimpleNamespace(
                prompt_token_ids=[1, 2, 3],
                outputs=[
                    SimpleNamespace(
                        text=c[-1]["content"][::-1], finish_reason="stop", token_ids=[9]
                    )
                ],
            )
            for c in conversations
        ]


class StubTokenizer:
    def apply_chat_template(self, conversation, add_generation_prompt, tokenize):
        return conversation[-1]["content"]

    def encode(self, text, add_special_tokens):
        return list(text.encode())


def backend_with(engine: StubEngine) -> VLLMBackend:
    backend = VLLMBackend(GenerateConfig(teacher="t", dataset="d.jsonl", backend="vllm"))
    backend._llm, backend._tokenizer, backend._max_model_len = engine, StubTokenizer(), 64
    backend.sampling_params = lambda sampling: None  # type: ignore[method-assign]
    return backend


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_rejected_batch_is_retried_prompt_by_prompt() -> None:
    engine = StubEngine()
    batch = [conv("abc"), conv("BAD"), conv("x" * 100), conv("def")]
    results = backend_with(engine).generate(batch, Sampling())
    assert [r.text for r in results] == ["cba", None, None, "fed"]
    assert (
        "vLLM rejected the prompt (ValueError: prompt rejected by validation)" in results[1].error
    )
    assert "prompt is 100 tokens but the teacher's context is 64" in results[2].error
    assert engine.calls == [3, 1, 1, 1]  # the long prompt never reached the engine


def test_dead_engine_is_an_error_not_a_batch_of_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    class EngineDeadError(Exception):
        """Stands in for vllm.v1.engine.exceptions.EngineDeadError (importing vLLM is slow)."""

    exceptions = SimpleNamespace(EngineDeadError=EngineDeadError)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.exceptions", exceptions)
    backend = backend_with(StubEngine(error=EngineDeadError("engine core died")))
    with pytest.raises(OpenkdError, match="the vLLM engine died"):
        backend.generate([conv("abc"), conv("def")], Sampling())
