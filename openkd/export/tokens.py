"""The tokenizer the full-sequence formats (axolotl-kd, distillkit) render prompts with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openkd.errors import OpenkdError, brief
from openkd.paths import model_path


@dataclass
class Tokens:
    """A chat tokenizer: prompt and conversation ids, end of turn, vocabulary size."""

    tokenizer: Any
    name: str

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Token ids below this exist (added tokens included)."""
        vocab = self.tokenizer.get_vocab()
        return max(len(self.tokenizer), max(vocab.values(), default=-1) + 1)

    def prompt_ids(self, prompt: list[dict[str, Any]]) -> list[int]:
        """The prompt with the generation prompt: what the teacher answered after."""
        return self._ids(prompt, add_generation_prompt=True)

    def conversation_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The whole conversation as a chat template renders it for training."""
        return self._ids(messages, add_generation_prompt=False)

    def _ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )
        return [int(t) for t in encoded["input_ids"]]


def load_tokens(name: str | None, what: str, *, trust_remote_code: bool = False) -> Tokens:
    """The tokenizer `name` (--tokenizer, else the teacher); one-line errors naming the fix."""
    if not name:
        raise OpenkdError(
            f"{what} needs a tokenizer to render the prompts, and the input's metadata names no "
            "teacher; pass --tokenizer (a model directory or Hub id)"
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            model_path(name), trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # offline Hub id, not a model (mock teachers), gated...
        raise OpenkdError(
            f"{what} needs the tokenizer {name} but it could not be loaded ({brief(exc, 160)}); "
            "pass --tokenizer with a local model directory (offline, a Hub id must be cached)"
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise OpenkdError(
            f"the tokenizer {name} has no chat template, so {what} cannot render the prompts "
            "as the teacher saw them; pass --tokenizer with a chat model's tokenizer"
        )
    return Tokens(tokenizer=tokenizer, name=name)
