"""The OpenAI-compatible teacher against a scripted local stand-in server (no vLLM needed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from openkd.errors import ConfigError, OpenkdError
from openkd.generate.backends.base import FINISH_ERROR, Request, Sampling, answer_in_order
from openkd.generate.backends.openai import OpenAIBackend, pool_sizes
from openkd.generate.backends.spec import teacher_spec
from openkd.generate.config import GenerateConfig
from tests.standin_openai import StandIn, completion

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=3)
CONV = [{"role": "user", "content": "Reverse the words: a b c"}]


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn().start()
    yield server
    server.stop()


def make_backend(base_url: str, **overrides) -> OpenAIBackend:
    settings = {
        "teacher": "teacher",
        "dataset": "unused.jsonl",
        "backend": "openai",
        "base_url": base_url,
        "max_retries": 2,
        "max_new_tokens": 16,
        **overrides,
    }
    backend = OpenAIBackend(teacher_spec(GenerateConfig(**settings)))
    backend.retry_base_delay = 0.001  # keep the schedule's shape, not its seconds
    return backend


def test_retries_500_then_keeps_length_and_usage(standin: StandIn) -> None:
    standin.script = [500, 500, completion("partial answ", "length", 11, 16)]
    with make_backend(standin.base_url) as backend:
        [result] = answer_in_order(backend, [CONV], GREEDY)
    assert not result.failed
    assert (result.text, result.finish_reason) == ("partial answ", "length")
    assert (result.prompt_tokens, result.completion_tokens) == (11, 16)
    assert len(standin.requests) == 3
    sent = standin.requests[-1]
    # Decoding settings go out explicitly on every request.
    assert sent["temperature"] == 0.0 and sent["top_p"] == 1.0
    assert sent["max_tokens"] == 16 and sent["seed"] == 3
    assert "stop" in sent and sent["stop"] is None
    assert sent["model"] == "teacher" and sent["messages"] == CONV


def test_always_500_becomes_failure_with_reason(standin: StandIn) -> None:
    standin.script = [500]
    with make_backend(standin.base_url, max_retries=2) as backend:
        [result] = answer_in_order(backend, [CONV], GREEDY)
    assert result.failed and result.text is None
    assert result.finish_reason == FINISH_ERROR
    assert "HTTP 500" in result.error and "scripted failure 500" in result.error
    assert "gave up after 3 attempts" in result.error
    assert len(standin.requests) == 3


def test_client_error_is_not_retried(standin: StandIn) -> None:
    standin.script = [400, completion()]
    with make_backend(standin.base_url) as backend:
        [result] = answer_in_order(backend, [CONV], GREEDY)
    assert result.failed and "HTTP 400" in result.error
    assert len(standin.requests) == 1


def test_429_waits_for_retry_after(standin: StandIn) -> None:
    standin.script = [429, completion("fine")]
    standin.retry_after = "0.3"
    with make_backend(standin.base_url) as backend:
        t0 = time.monotonic()
        [result] = answer_in_order(backend, [CONV], GREEDY)
        waited = time.monotonic() - t0
    assert result.text == "fine"
    assert waited >= 0.3


def test_connection_errors_are_retried_then_fail(standin: StandIn) -> None:
    backend = make_backend(standin.base_url, max_retries=1)
    with backend:
        standin.stop()  # the server goes away after start-up succeeded
        [result] = answer_in_order(backend, [CONV], GREEDY)
    assert result.failed
    assert "Connection error" in result.error and "gave up after 2 attempts" in result.error


def test_request_timeout_fails_the_request(standin: StandIn) -> None:
    standin.latency = 2.0
    with make_backend(standin.base_url, request_timeout=0.2, max_retries=0) as backend:
        t0 = time.monotonic()
        [result] = answer_in_order(backend, [CONV], GREEDY)
        assert time.monotonic() - t0 < 1.5
    assert result.failed and "timed out" in result.error


def test_backoff_is_exponential_capped_and_seeded() -> None:
    a = make_backend("http://127.0.0.1:9/v1")
    b = make_backend("http://127.0.0.1:9/v1")
    for backend in (a, b):
        backend.retry_base_delay, backend.retry_max_delay = 1.0, 8.0
    delays = [a.backoff(k) for k in range(6)]
    assert delays == [b.backoff(k) for k in range(6)]  # same seed, same schedule
    for k, delay in enumerate(delays):
        assert 0.5 * min(8.0, 2**k) <= delay <= min(8.0, 2**k)


def test_batch_runs_concurrently_in_order_on_one_loop(standin: StandIn) -> None:
    standin.echo, standin.latency = True, 0.1
    batch = [[{"role": "user", "content": f"prompt {i}"}] for i in range(8)]
    with make_backend(standin.base_url, concurrency=2) as backend:
        loop = backend._loop
        first = answer_in_order(backend, batch, GREEDY)
        second = answer_in_order(backend, batch[:2], GREEDY)
        assert backend._loop is loop and not loop.is_closed()
    assert [r.text for r in first] == [f"prompt {i}" for i in range(8)]
    assert [r.text for r in second] == ["prompt 0", "prompt 1"]
    assert standin.max_in_flight == 2


def test_window_refills_as_answers_land_and_stops_on_a_failing_prompt_reader(
    standin: StandIn,
) -> None:
    standin.echo, standin.latency = True, 0.05

    def requests() -> Iterator[Request]:
        for i in range(6):
            yield Request(f"id-{i}", [{"role": "user", "content": f"prompt {i}"}])
        raise OSError("the dataset file went away")

    answered = []
    with make_backend(standin.base_url, concurrency=3) as backend:
        with pytest.raises(OSError, match="went away"):
            for request, completion in backend.stream(requests(), GREEDY):
                answered.append((request.id, completion.text))
        # Nothing is left running on the loop, and the backend still answers.
        assert backend._loop is not None and not asyncio.all_tasks(backend._loop)
        [again] = answer_in_order(backend, [CONV], GREEDY)
    assert standin.max_in_flight == 3
    # The prompts read before the failure were answered (the rest of the window may be cut).
    assert answered and all(text == f"prompt {rid[3:]}" for rid, text in answered)
    assert again.text == CONV[0]["content"]


@pytest.mark.parametrize("logprobs", [None, 3])
def test_requests_are_what_the_sdk_sends(standin: StandIn, logprobs: int | None) -> None:
    """The body and headers openkd posts equal those of `chat.completions.create` with the same
    arguments (the sample's seed, the stop list, the log-probability fields)."""
    from openai import AsyncOpenAI

    sampled = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=16, stop=("###",), seed=3)
    request = Request("id-0", CONV, sample=2, prompt_id="p")
    with make_backend(standin.base_url, logprobs=logprobs, temperature=0.7) as backend:
        list(backend.stream([request], sampled))
        timeout = backend.cfg.request_timeout
    extra: dict = {}
    if logprobs:
        extra = {
            "logprobs": True,
            "top_logprobs": logprobs + 1,  # sampling: one more (`server_logprobs`)
            "extra_body": {"return_tokens_as_token_ids": True},
        }

    async def with_the_sdk() -> None:
        client = AsyncOpenAI(
            base_url=standin.base_url, api_key="EMPTY", max_retries=0, timeout=timeout
        )
        await client.chat.completions.create(
            model="teacher",
            messages=CONV,
            temperature=0.7,
            top_p=0.9,
            max_tokens=16,
            seed=5,
            stop=["###"],
            n=1,
            **extra,
        )
        await client.close()

    asyncio.run(with_the_sdk())
    ours, theirs = standin.requests[-2:]
    assert ours == theirs and ours["seed"] == 5 and ours["stop"] == ["###"]
    if logprobs:
        assert ours["return_tokens_as_token_ids"] is True
    assert standin.headers[-2] == standin.headers[-1]


def test_requests_spread_over_small_pools() -> None:
    """Many requests in flight use several connection pools, none holding more requests than
    connections; every request is answered once."""
    assert pool_sizes(1) == (1, 1) and pool_sizes(32) == (1, 32)
    assert pool_sizes(33) == (2, 17) and pool_sizes(256) == (8, 32)
    assert pool_sizes(1000) == (32, 32)
    server = StandIn(backlog=128, echo=True, latency=0.3).start()
    try:
        prompts = [[{"role": "user", "content": f"prompt {i}"}] for i in range(80)]
        with make_backend(server.base_url, concurrency=40) as backend:
            assert len(backend._clients) == 2
            answers = answer_in_order(backend, prompts, GREEDY)
            assert sorted(backend._free) == [0] * 20 + [1] * 20  # every slot handed back
    finally:
        server.stop()
    assert [a.text for a in answers] == [f"prompt {i}" for i in range(80)]
    assert server.max_in_flight == 40 and len(server.requests) == 80


def test_teacher_not_served_names_the_served_models(standin: StandIn) -> None:
    standin.models = [{"id": "Qwen/Qwen2.5-7B-Instruct"}, {"id": "other"}]
    with pytest.raises(OpenkdError) as info:
        make_backend(standin.base_url, teacher="meta-llama/Llama-3.1-8B-Instruct").start()
    message = str(info.value)
    assert "'meta-llama/Llama-3.1-8B-Instruct' is not served" in message
    assert "Qwen/Qwen2.5-7B-Instruct, other" in message
    assert standin.requests == []  # nothing generated


def test_unreachable_endpoint_is_one_line_error() -> None:
    from openkd.generate.vllm.server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(OpenkdError) as info:
        make_backend(url).start()
    message = str(info.value)
    assert message.startswith(f"cannot reach teacher server at {url}")
    assert "or pass --serve" in message and "\n" not in message


def test_missing_v1_suffix_gets_a_hint(standin: StandIn) -> None:
    root = standin.base_url.removesuffix("/v1")
    with pytest.raises(OpenkdError, match=r"did you mean .*/v1\?"):
        make_backend(root).start()


def test_answer_budget_checked_against_served_context(standin: StandIn) -> None:
    standin.models = [{"id": "teacher", "max_model_len": 512}]
    with pytest.raises(
        ConfigError, match="--max-new-tokens 4096 exceeds the teacher's context length 512"
    ):
        make_backend(standin.base_url, max_new_tokens=4096).start()


def test_api_key_from_named_env_var_never_in_errors(
    standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEACHER_KEY", "sk-secret-123")
    standin.script = [401]
    with make_backend(standin.base_url, api_key_env="TEACHER_KEY") as backend:
        [result] = answer_in_order(backend, [CONV], GREEDY)
        assert "sk-secret-123" not in repr(backend.versions())
    assert standin.headers[0]["authorization"] == "Bearer sk-secret-123"
    assert result.failed and "HTTP 401" in result.error
    assert "sk-secret-123" not in result.error


def test_unset_key_sends_dummy(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with make_backend(standin.base_url) as backend:
        answer_in_order(backend, [CONV], GREEDY)
        assert backend.versions()["teacher_server"] == "standin-1"
    assert {h["authorization"] for h in standin.headers} == {"Bearer EMPTY"}


def test_close_is_idempotent(standin: StandIn) -> None:
    backend = make_backend(standin.base_url)
    with backend:
        pass
    backend.close()
    with pytest.raises(OpenkdError, match="not started"):
        answer_in_order(backend, [CONV], GREEDY)


def test_sampled_top_k_drops_a_sampled_token_ranked_below_k(standin: StandIn) -> None:
    """A vLLM server lists the sampled token first, then ranks 1, 2, ..., and sends the first
    `top_logprobs` of them. Sampling at K=3, openkd asks for 4 and keeps the true top 3, also
    where the sampled token ranks 5th (it would otherwise push rank 3 out)."""
    ranked = [(100, -0.5), (101, -1.0), (102, -1.5), (103, -2.0), (104, -2.5)]

    def position(chosen: int, n: int) -> dict:
        value = dict(ranked)[chosen]
        entries = [(chosen, value)] + [entry for entry in ranked if entry[0] != chosen]
        return {
            "token": f"token_id:{chosen}",
            "logprob": value,
            "top_logprobs": [{"token": f"token_id:{i}", "logprob": v} for i, v in entries[:n]],
        }

    standin.logprobs = lambda prompt, n: [position(104, n), position(102, n), position(100, n)]
    sampled = Sampling(temperature=0.8, max_new_tokens=16, seed=3)
    with make_backend(standin.base_url, logprobs=3, temperature=0.8) as backend:
        [result] = answer_in_order(backend, [CONV], sampled)
    assert standin.requests[-1]["top_logprobs"] == 4
    assert result.logprobs is not None
    assert result.logprobs.token_ids.tolist() == [104, 102, 100]
    assert result.logprobs.top_ids.tolist() == [[100, 101, 102]] * 3
    assert result.logprobs.top_logprobs.tolist() == [[-0.5, -1.0, -1.5]] * 3

    with make_backend(standin.base_url, logprobs=3) as greedy:  # rank 1 is chosen: K is enough
        answer_in_order(greedy, [CONV], GREEDY)
    assert standin.requests[-1]["top_logprobs"] == 3


def test_a_served_engine_allows_the_extra_log_probability_when_sampling() -> None:
    from openkd.generate.vllm.options import engine_options

    def options(**overrides) -> dict:
        return engine_options(
            teacher_spec(GenerateConfig(teacher="t", dataset="d.jsonl", **overrides))
        )

    assert "max_logprobs" not in options(logprobs=20)  # vLLM's default limit is 20
    assert options(logprobs=20, temperature=0.7)["max_logprobs"] == 21
    assert options(logprobs=32)["max_logprobs"] == 32
