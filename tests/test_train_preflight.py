"""Pre-flight checks as pure functions: end-of-turn vs EOS, loss masks, prompt lengths."""

from __future__ import annotations

import copy

import pytest

from openkd.chat import find_end_of_turn
from openkd.errors import OpenkdError
from openkd.train import preflight
from openkd.train.preflight import (
    IGNORE,
    check_eos,
    check_loss_mask,
    check_prompts_fit,
    drop_after_last_eos,
    loss_segments,
    marked_text,
)
from tests.train_helpers import QWEN_STYLE

# A template that never closes the last assistant turn.
NO_END = (
    "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] }}"
    "{%- if not loop.last %}{{- '<|im_end|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_end|>assistant: ' }}{%- endif %}"
)
PROMPT = [{"role": "user", "content": "Reverse the words: apple river stone"}]
ANSWER = "stone river apple"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _example(tokenizer, template=None):
    """Prompt+answer ids and labels the way TRL builds them: loss after the common prefix."""
    template = template or tokenizer.chat_template
    prompt_ids = tokenizer.apply_chat_template(
        PROMPT, chat_template=template, tokenize=True, add_generation_prompt=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(
        [*PROMPT, {"role": "assistant", "content": ANSWER}], chat_template=template, tokenize=True
    )["input_ids"]
    n = len(prompt_ids)
    assert full[:n] == prompt_ids
    return {"input_ids": full, "labels": [IGNORE] * n + full[n:]}


def test_end_of_turn_of_tiny_template_is_its_eos(tokenizer):
    eot = find_end_of_turn(tokenizer, tokenizer.chat_template)
    assert (eot.token, eot.token_id, eot.trailing) == ("<|im_end|>", 2, "")
    _, lines = check_eos(tokenizer, tokenizer.chat_template, model_eos=2, generation_eos=[2])
    assert "'<|im_end|>' (id 2) = tokenizer eos" in lines[0]


def test_trailing_newline_after_end_of_turn_is_reported(tokenizer):
    eot = find_end_of_turn(tokenizer, QWEN_STYLE)
    assert (eot.token, eot.token_id, eot.trailing) == ("<|im_end|>", 2, "\n")


def test_tokenizer_eos_differing_from_template_is_an_error_with_the_fix(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.eos_token = "<|endoftext|>"
    with pytest.raises(OpenkdError) as err:
        check_eos(broken, broken.chat_template, model_eos=2, generation_eos=2)
    msg = str(err.value)
    assert "ends assistant turns with '<|im_end|>' (id 2)" in msg
    assert "tokenizer's eos is '<|endoftext|>' (id 0)" in msg
    assert "--eos-token '<|im_end|>'" in msg and "--chat-template" in msg
    assert "\n" not in msg


def test_generation_config_eos_must_include_end_of_turn(tokenizer):
    with pytest.raises(OpenkdError, match=r"generation_config\.eos_token_id is \[0\].*--eos-token"):
        check_eos(tokenizer, tokenizer.chat_template, model_eos=2, generation_eos=0)
    with pytest.raises(OpenkdError, match=r"generation_config\.eos_token_id is None"):
        check_eos(tokenizer, tokenizer.chat_template, model_eos=2, generation_eos=None)
    # Several stop ids (as Llama 3 ships) are fine when the end-of-turn is one of them.
    check_eos(tokenizer, tokenizer.chat_template, model_eos=[0, 2], generation_eos=[0, 2])


def test_model_config_eos_must_include_end_of_turn(tokenizer):
    with pytest.raises(OpenkdError, match=r"model config's eos_token_id is \[0\]"):
        check_eos(tokenizer, tokenizer.chat_template, model_eos=0, generation_eos=2)
    # A config without eos leaves stopping to generation_config.
    check_eos(tokenizer, tokenizer.chat_template, model_eos=None, generation_eos=2)


def test_eos_token_override_must_be_the_template_end_of_turn(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.eos_token = "<|endoftext|>"
    eot, lines = check_eos(
        broken, broken.chat_template, model_eos=0, generation_eos=0, eos_token="<|im_end|>"
    )
    assert eot.token_id == 2 and "--eos-token" in lines[0]
    with pytest.raises(OpenkdError, match=r"--eos-token is '<\|endoftext\|>'"):
        check_eos(
            broken, broken.chat_template, model_eos=0, generation_eos=0, eos_token="<|endoftext|>"
        )
    with pytest.raises(OpenkdError, match=r"not in the student's vocabulary"):
        check_eos(broken, broken.chat_template, model_eos=0, generation_eos=0, eos_token="</s>")


def test_template_without_end_of_turn_is_an_error(tokenizer):
    with pytest.raises(OpenkdError, match=r"no end-of-turn token.*--chat-template"):
        find_end_of_turn(tokenizer, NO_END)


def test_template_that_fails_to_render_is_an_error(tokenizer):
    with pytest.raises(OpenkdError, match=r"failed to render.*boom"):
        find_end_of_turn(tokenizer, "{{ raise_exception('boom') }}")


def test_loss_mask_covers_answer_and_eos_only(tokenizer):
    example = _example(tokenizer)
    report = check_loss_mask(tokenizer, example, answer=ANSWER, prompt=PROMPT, eos_id=2)
    assert report.trained_text == ANSWER + "<|im_end|>"
    assert report.extra_text == ""
    segments = loss_segments(tokenizer, example["input_ids"], example["labels"])
    assert [s for s, trained in segments if trained] == [ANSWER + "<|im_end|>"]
    assert "".join(s for s, _ in segments).endswith("assistant\n" + ANSWER + "<|im_end|>")
    assert marked_text(segments, markers=True).plain.endswith("⟦" + ANSWER + "<|im_end|>⟧")


def test_eos_outside_the_loss_mask_is_an_error(tokenizer):
    example = _example(tokenizer)
    example["labels"][-1] = IGNORE  # the end-of-turn token is not trained
    with pytest.raises(OpenkdError, match=r"'<\|im_end\|>' \(id 2\) is outside the loss mask"):
        check_loss_mask(tokenizer, example, answer=ANSWER, prompt=PROMPT, eos_id=2)


def test_prompt_inside_the_loss_mask_is_an_error(tokenizer):
    example = _example(tokenizer)
    example["labels"] = list(example["input_ids"])  # everything trained
    with pytest.raises(OpenkdError, match=r"covers the prompt"):
        check_loss_mask(tokenizer, example, answer=ANSWER, prompt=PROMPT, eos_id=2)


def test_example_without_trained_tokens_is_an_error(tokenizer):
    example = _example(tokenizer)
    example["labels"] = [IGNORE] * len(example["labels"])
    with pytest.raises(OpenkdError, match=r"no loss-bearing tokens"):
        check_loss_mask(tokenizer, example, answer=ANSWER, prompt=PROMPT, eos_id=2)


def test_trailing_template_tokens_are_dropped_after_the_last_eos(tokenizer):
    example = _example(tokenizer, QWEN_STYLE)
    assert example["input_ids"][-2:] == [2, tokenizer.convert_tokens_to_ids("Ċ")]
    ids, labels = drop_after_last_eos(example["input_ids"], example["labels"], 2)
    assert ids == example["input_ids"][:-1] and ids[-1] == 2 and len(labels) == len(ids)
    report = check_loss_mask(
        tokenizer, {"input_ids": ids, "labels": labels}, answer=ANSWER, prompt=PROMPT, eos_id=2
    )
    assert report.trained_text == ANSWER + "<|im_end|>"
    # An example cut before its EOS (at --max-length) is left alone.
    assert drop_after_last_eos([5, 6, 7], [IGNORE, 6, 7], 2) == ([5, 6, 7], [IGNORE, 6, 7])


def test_prompt_lengths_are_scanned_lazily_and_all_too_long_is_an_error():
    def lengths():
        yield from (30, 12)
        raise AssertionError("read past the first prompt that fits")

    assert check_prompts_fit(lengths(), 20) == 1
    with pytest.raises(OpenkdError) as err:
        check_prompts_fit(iter([30, 25, 41]), 20)
    msg = str(err.value)
    assert "--max-length 20" in msg and "shortest 25" in msg and "longest 41" in msg
    assert "larger than 41" in msg


def test_prompt_length_uses_the_generation_prompt(tokenizer):
    n = preflight.prompt_length(tokenizer, tokenizer.chat_template, PROMPT)
    with_prompt = tokenizer.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True)
    assert n == len(with_prompt["input_ids"])
