"""Checks run before the first training step, as pure functions over a tokenizer and examples.

A student only learns to stop if (1) the token its chat template ends an assistant turn with is
the token generation stops on (tokenizer EOS, generation_config and model config eos), and
(2) that token is inside the loss mask of every training example. Both fail silently in
training (the loss looks healthy) and only show at inference as a student that never stops,
so a mismatch is an error here, not a warning.

Tokens the template puts after the end-of-turn token at the end of a conversation (Qwen's
ChatML writes `<|im_end|>\\n`) are dropped from every training example by openkd: generation
stops at EOS, so the student never produces them, and training on them only teaches what
follows a stop. Each example then ends exactly at its EOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from openkd.chat import EndOfTurn, as_id_list, find_end_of_turn
from openkd.errors import OpenkdError

IGNORE = -100


def check_eos(
    tokenizer: Any,
    template: str,
    *,
    model_eos: int | Sequence[int] | None,
    generation_eos: int | Sequence[int] | None,
    eos_token: str | None = None,
) -> tuple[EndOfTurn, list[str]]:
    """Raise unless the template's end-of-turn token is the student's EOS everywhere.

    `eos_token` is `--eos-token`: TRL makes it the tokenizer's EOS and adds it to the model
    config and generation config, so only the template has to agree with it. Returns the
    end-of-turn token and the lines to print.
    """
    eot = find_end_of_turn(tokenizer, template)
    said = f"the chat template ends assistant turns with {eot.token!r} (id {eot.token_id})"
    fix_eos = f"pass --eos-token '{eot.token}' to make it the student's EOS"
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise OpenkdError(
                f"--eos-token {eos_token!r} is not in the student's vocabulary; {said}, so "
                f"pass --eos-token '{eot.token}'"
            )
        if eos_token != eot.token:
            raise OpenkdError(
                f"{said} but --eos-token is {eos_token!r}; pass --eos-token '{eot.token}', or "
                f"--chat-template FILE whose assistant turns end with {eos_token!r}"
            )
        return eot, [
            f"end-of-turn {eot.token!r} (id {eot.token_id}) becomes the student's EOS "
            "(--eos-token): tokenizer, config and generation_config"
        ]
    tok_eos, tok_eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if tok_eos_id != eot.token_id:
        raise OpenkdError(
            f"{said} but the tokenizer's eos is {tok_eos!r} (id {tok_eos_id}), so the trained "
            f"student would not stop; {fix_eos}, or --chat-template FILE whose assistant turns "
            f"end with {tok_eos!r}"
        )
    gen_ids = as_id_list(generation_eos)
    if not gen_ids or eot.token_id not in gen_ids:
        raise OpenkdError(
            f"{said} but generation_config.eos_token_id is {gen_ids}, so generation would not "
            f"stop there; {fix_eos} (it is added to generation_config)"
        )
    model_ids = as_id_list(model_eos)
    if model_ids is not None and eot.token_id not in model_ids:
        raise OpenkdError(
            f"{said} but the model config's eos_token_id is {model_ids}; {fix_eos} (it is set "
            "in the model config)"
        )
    return eot, [
        f"end-of-turn {eot.token!r} (id {eot.token_id}) = tokenizer eos = generation_config "
        f"eos {gen_ids}" + (f" = config eos {model_ids}" if model_ids is not None else "")
    ]


def prompt_length(tokenizer: Any, template: str, prompt: list[dict[str, str]]) -> int:
    """Tokens of a prompt as the student sees it: rendered with the generation prompt."""
    encoded = tokenizer.apply_chat_template(
        prompt, chat_template=template, tokenize=True, add_generation_prompt=True
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return len(ids)


def check_prompts_fit(lengths: Iterable[int], max_length: int) -> int:
    """Index of the first prompt shorter than `max_length`; raise if there is none.

    `lengths` is consumed lazily, so a dataset whose first prompt fits costs one tokenization.
    """
    seen: list[int] = []
    for index, length in enumerate(lengths):
        if length < max_length:
            return index
        seen.append(length)
    raise OpenkdError(
        f"--max-length {max_length} is shorter than every prompt ({len(seen)} rows, shortest "
        f"{min(seen)} tokens, longest {max(seen)} tokens with the chat template), so no example "
        f"keeps a single answer token; pass --max-length larger than {max(seen)} (answers need "
        "room too)"
    )


def drop_after_last_eos(
    input_ids: list[int], labels: list[int], eos_id: int
) -> tuple[list[int], list[int]]:
    """Cut the trained tokens that follow the last trained EOS (template trailing text)."""
    for i in range(len(input_ids) - 1, -1, -1):
        if input_ids[i] == eos_id and labels[i] != IGNORE:
            return input_ids[: i + 1], labels[: i + 1]
    return input_ids, labels


def loss_segments(
    tokenizer: Any, input_ids: list[int], labels: list[int]
) -> list[tuple[str, bool]]:
    """The example's text in runs of (text, trained?), decoded with special tokens shown."""
    segments: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            segments.append((text, labels[start] != IGNORE))
            start = i
    return segments


@dataclass(frozen=True)
class MaskReport:
    trained_text: str
    trained_tokens: int
    total_tokens: int
    extra_text: str  # trained text that is neither the answer nor the end-of-turn token


def check_loss_mask(
    tokenizer: Any,
    example: dict[str, list[int]],
    *,
    answer: str,
    prompt: list[dict[str, str]],
    eos_id: int,
) -> MaskReport:
    """Raise unless the loss covers the answer and its EOS, and none of the prompt."""
    input_ids, labels = list(example["input_ids"]), list(example["labels"])
    trained = [t for t, lab in zip(input_ids, labels, strict=True) if lab != IGNORE]
    eos = tokenizer.convert_ids_to_tokens(eos_id)
    if not trained:
        raise OpenkdError(
            "the first training example has no loss-bearing tokens: the chat template renders "
            "the prompt alone differently from prompt + answer; pass --chat-template FILE"
        )
    if eos_id not in trained:
        raise OpenkdError(
            f"the end-of-turn token {eos!r} (id {eos_id}) is outside the loss mask of the first "
            "training example, so the student would never learn to stop; pass --chat-template "
            f"FILE whose assistant turns end with {eos!r} inside the rendered answer"
        )
    if trained[-1] != eos_id:
        raise OpenkdError(
            f"the first training example's loss ends with "
            f"{tokenizer.decode(trained[-1:], skip_special_tokens=False)!r}, not the end-of-turn "
            f"token {eos!r}; check --chat-template"
        )
    trained_text = tokenizer.decode(trained, skip_special_tokens=False)
    untrained_text = tokenizer.decode(
        [t for t, lab in zip(input_ids, labels, strict=True) if lab == IGNORE],
        skip_special_tokens=False,
    )
    if answer.strip() and answer.strip() not in trained_text:
        raise OpenkdError(
            "the loss mask of the first training example does not cover the teacher's answer "
            f"(trained text: {trained_text[:120]!r}); check --chat-template"
        )
    last_user = next((m["content"] for m in reversed(prompt) if m.get("content")), "")
    if last_user.strip() and last_user.strip() not in untrained_text:
        raise OpenkdError(
            "the loss mask of the first training example covers the prompt, so the student "
            "would be trained to write the user's message; check --chat-template"
        )
    body = trained_text[: -len(eos)] if trained_text.endswith(eos) else trained_text
    extra = body.replace(answer, "", 1) if answer else body
    return MaskReport(
        trained_text=trained_text,
        trained_tokens=len(trained),
        total_tokens=len(input_ids),
        extra_text=extra,
    )


def marked_text(segments: list[tuple[str, bool]], *, markers: bool):
    """A rich Text of the example with the loss-bearing part highlighted.

    `markers` also wraps it in ⟦ ⟧, for logs where colours are lost.
    """
    from rich.text import Text

    text = Text()
    for part, trained in segments:
        if trained:
            text.append("⟦" + part + "⟧" if markers else part, style="bold black on green")
        else:
            text.append(part, style="dim")
    return text
