"""What a tokenizer's chat template does, found by rendering it: shared by train and eval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openkd.errors import OpenkdError, brief

# An answer no tokenizer merges with its neighbours, to find what the template puts around it.
PROBE_ANSWER = "Probe answer 42."
PROBE_PROMPT = [{"role": "user", "content": "Probe question?"}]


@dataclass(frozen=True)
class EndOfTurn:
    """How the chat template ends an assistant turn."""

    token: str
    token_id: int
    trailing: str  # text after the token at the end of a conversation ("" for most templates)


def template_text(tokenizer: Any) -> str | None:
    """The tokenizer's chat template as one string (the "default" one of a named set)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise OpenkdError(
            f"the chat template failed to render a user/assistant exchange ({brief(exc)}); "
            "pass --chat-template FILE with a template for this student"
        ) from exc


def find_end_of_turn(tokenizer: Any, template: str) -> EndOfTurn:
    """The token the template closes an assistant answer with, found by rendering a probe."""
    rendered = _render(
        tokenizer, template, [*PROBE_PROMPT, {"role": "assistant", "content": PROBE_ANSWER}]
    )
    at = rendered.rfind(PROBE_ANSWER)
    if at < 0:
        raise OpenkdError(
            "the chat template does not render the assistant's answer, so the student cannot "
            "be trained on it; pass --chat-template FILE with a template that does"
        )
    suffix = rendered[at + len(PROBE_ANSWER) :]
    body = suffix.lstrip()
    eos = getattr(tokenizer, "eos_token", None)
    if not body:
        raise OpenkdError(
            "the chat template ends an assistant answer with no end-of-turn token, so the "
            "student never learns to stop; pass --chat-template FILE with a template whose "
            f"assistant turns end with the EOS token {eos!r}"
        )
    specials = dict(tokenizer.get_added_vocab())
    if eos:
        specials.setdefault(eos, tokenizer.convert_tokens_to_ids(eos))
    matches = [tok for tok in specials if tok and body.startswith(tok)]
    if matches:
        token = max(matches, key=len)
        token_id = specials[token]
    else:
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        token_id = ids[0]
        token = tokenizer.decode([token_id])
    return EndOfTurn(token=token, token_id=int(token_id), trailing=body[len(token) :])


def as_id_list(value: int | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def prompt_ids(tokenizer: Any, prompt: list[dict[str, str]]) -> list[int]:
    """The prompt as the student sees it at inference: its chat template + generation prompt."""
    encoded = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])
