"""Teacher-forced NLL: batched, left-padded scoring equals scoring each example alone, on the
answer tokens only, ending at EOS like training."""

from __future__ import annotations

import pytest

PAIRS = [
    ([{"role": "user", "content": "Reverse the words: apple river stone night tiger"}], "x y z"),
    ([{"role": "user", "content": "hi"}], "hello there, how are you doing today my friend"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], ""),
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from openkd.generate.backends.transformers import load_causal_lm

    return load_causal_lm(str(tiny_model))


def _alone(model, ids: list[int], n: int) -> float:
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(input_ids=x).logits[0]
    losses = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="none")
    return float(losses[-n:].sum())


def test_batched_scores_equal_scoring_each_answer_alone(model_and_tokenizer):
    from openkd.eval.nll import encode_pair, score_answers

    model, tokenizer = model_and_tokenizer
    scored = score_answers(model, tokenizer, PAIRS, batch_size=8, max_length=512)
    for (prompt, answer), result in zip(PAIRS, scored, strict=True):
        ids, n = encode_pair(tokenizer, prompt, answer, 512)
        assert result.tokens == n
        assert result.nll == pytest.approx(_alone(model, ids, n), rel=1e-4)
    # The empty answer still has one token to predict: the end of the turn (EOS).
    assert scored[2].tokens == 1


def test_answer_tokens_are_the_answer_and_eos(model_and_tokenizer):
    from openkd.eval.nll import encode_pair

    _, tokenizer = model_and_tokenizer
    ids, n = encode_pair(tokenizer, *PAIRS[0], 512)
    assert tokenizer.decode(ids[-n:]) == "x y z<|im_end|>"
    cut, m = encode_pair(tokenizer, *PAIRS[0], max_length=len(ids) - 2)
    assert len(cut) == len(ids) - 2 and m == n - 2


def test_template_text_after_eos_is_not_scored(model_and_tokenizer):
    """Qwen-style templates write a newline after the final <|im_end|>; training drops it."""
    from openkd.eval.nll import encode_pair, trailing_end_of_turn
    from openkd.tiny.model import CHAT_TEMPLATE

    _, tokenizer = model_and_tokenizer
    assert trailing_end_of_turn(tokenizer) is None
    qwen_like = CHAT_TEMPLATE.replace(
        "{%- if not loop.last %}{{- '\\n' }}{%- endif %}", "{{- '\\n' }}"
    )
    assert qwen_like != CHAT_TEMPLATE
    tokenizer.chat_template = qwen_like
    try:
        rendered = tokenizer.apply_chat_template(
            [*PAIRS[0][0], {"role": "assistant", "content": "a"}], tokenize=False
        )
        assert rendered.endswith("a<|im_end|>\n")
        eot = trailing_end_of_turn(tokenizer)
        assert eot == tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids, n = encode_pair(tokenizer, *PAIRS[0], 512, end_of_turn=eot)
        assert ids[-1] == eot and tokenizer.decode(ids[-n:]) == "x y z<|im_end|>"
    finally:
        tokenizer.chat_template = CHAT_TEMPLATE
