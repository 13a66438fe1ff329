"""The transformers backend: EOS and stop strings end answers, padding does not change them."""

from __future__ import annotations

import pytest

from openkd.generate.backends.base import Sampling, answer_in_order
from openkd.generate.backends.transformers import first_stop, split_at_eos


def test_split_at_eos():
    assert split_at_eos([5, 6, 2, 0, 0], {2}, pad_id=0) == ([5, 6], True)
    assert split_at_eos([2], {2}, pad_id=0) == ([], True)
    # No EOS: the answer ran to the limit; only trailing pads (never real here) are dropped.
    assert split_at_eos([5, 6, 7], {2}, pad_id=0) == ([5, 6, 7], False)
    assert split_at_eos([5, 0, 0], {2}, pad_id=0) == ([5], False)
    # When pad is also an EOS id, the first one ends the answer.
    assert split_at_eos([5, 9, 9], {2, 9}, pad_id=9) == ([5], True)


def test_first_stop():
    assert first_stop("abc END def STOP", ("STOP", "END")) == 4
    assert first_stop("abc", ("x",)) is None
    assert first_stop("abc", ()) is None


@pytest.fixture(scope="module")
def backend(tiny_model):
    from openkd.generate.backends import make_backend
    from openkd.generate.backends.spec import teacher_spec
    from openkd.generate.config import GenerateConfig

    cfg = GenerateConfig(
        teacher=str(tiny_model), dataset="unused", backend="transformers", max_model_len=40
    )
    with make_backend(teacher_spec(cfg)) as b:
        yield b


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_batched_left_padded_answers_equal_one_by_one(backend):
    from openkd.tiny import make_prompts

    prompts = [_chat(p) for p in make_prompts(6, seed=9, min_words=1, max_words=5)]
    sampling = Sampling(max_new_tokens=6)
    together = answer_in_order(backend, prompts, sampling)
    alone = [answer_in_order(backend, [p], sampling)[0] for p in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    for c in together:
        assert c.finish_reason == "length" and c.completion_tokens == 6 and c.prompt_tokens > 5


def test_stop_string_ends_the_answer(backend):
    sampling = Sampling(max_new_tokens=6)
    free = answer_in_order(backend, [_chat("Reverse the words: apple river")], sampling)[0]
    assert len(free.text) > 1
    cut = free.text[1:3]
    stopped = answer_in_order(
        backend, [_chat("Reverse the words: apple river")], Sampling(max_new_tokens=6, stop=(cut,))
    )
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].text == free.text[: free.text.index(cut)]


def test_prompt_longer_than_the_context_fails_alone(backend):
    long_prompt = _chat(" ".join(["apple"] * 60))
    out = answer_in_order(backend, [long_prompt, _chat("hi")], Sampling(max_new_tokens=4))
    assert out[0].failed and "context is 40" in out[0].error
    assert not out[1].failed and out[1].text is not None
