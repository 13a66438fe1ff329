"""Teacher-forced likelihood of the teacher's answers under a model, tokenised like training.

Each example is rendered as TRL's SFT renders a conversational prompt/completion pair: the
prompt with the generation prompt, the prompt plus the answer through the chat template, and
the answer's tokens are where the two diverge. Like `openkd train`, tokens the template writes
after the end-of-turn token (Qwen's trailing newline) are dropped, so an answer ends at its
EOS. Only the answer tokens are scored: the number is the per-token loss `openkd train`
minimises, measured on held-out prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from openkd.data.schema import Message


@dataclass(frozen=True)
class Scored:
    """Summed negative log-likelihood (nats) over an answer's `tokens` tokens."""

    nll: float
    tokens: int

    @property
    def mean(self) -> float | None:
        return self.nll / self.tokens if self.tokens else None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def trailing_end_of_turn(tokenizer: Any) -> int | None:
    """The end-of-turn token id when the chat template writes text after it, else None."""
    from openkd.chat import find_end_of_turn, template_text
    from openkd.errors import OpenkdError

    template = template_text(tokenizer)
    if not template:
        return None
    try:
        eot = find_end_of_turn(tokenizer, template)
    except OpenkdError:
        return None
    return eot.token_id if eot.trailing else None


def encode_pair(
    tokenizer: Any,
    prompt: list[Message],
    answer: str,
    max_length: int,
    end_of_turn: int | None = None,
) -> tuple[list[int], int]:
    """(ids of prompt + answer cut to `max_length`, number of answer tokens at the end)."""
    prompt_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full = list(
        tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=True
        )["input_ids"]
    )
    start = max(common_prefix(prompt_ids, full), 1)
    if end_of_turn is not None and end_of_turn in full[start:]:
        last = len(full) - 1 - full[::-1].index(end_of_turn)
        full = full[: last + 1]
    full = full[:max_length]
    return full, max(len(full) - start, 0)


def shortest_prompt(
    tokenizer: Any, prompts: Sequence[list[Message]], max_length: int
) -> int | None:
    """None when some prompt leaves room for an answer token within `max_length` (or the
    tokenizer has no chat template); else the length of the shortest prompt, in tokens."""
    shortest: int | None = None
    for prompt in prompts:
        try:
            ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        except (ValueError, TypeError):  # no chat template: scoring says so itself
            return None
        if len(ids) < max_length:
            return None
        shortest = len(ids) if shortest is None else min(shortest, len(ids))
    return shortest


def token_budget_batches(
    lengths: Sequence[int], max_batch: int, max_tokens: int
) -> list[list[int]]:
    """Indices grouped longest first, at most `max_batch` per group and about `max_tokens` padded
    tokens per group (a single longer example still gets its own group)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= max_batch or longest * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def score_answers(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[list[Message], str]],
    *,
    batch_size: int,
    max_length: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[Scored]:
    """The NLL of each answer given its prompt. Answers with no tokens score (0, 0)."""
    import torch

    end_of_turn = trailing_end_of_turn(tokenizer)
    encoded = [
        encode_pair(tokenizer, prompt, answer, max_length, end_of_turn) for prompt, answer in pairs
    ]
    results: list[Scored] = [Scored(0.0, 0)] * len(encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    lengths = [len(ids) for ids, _ in encoded]
    for group in token_budget_batches(lengths, batch_size, max_tokens=batch_size * 1024):
        # Left padding keeps every answer at the end of its row, so only the last
        # `longest answer + 1` positions need logits (the vocabulary is large).
        width = max(lengths[i] for i in group)
        keep = max(encoded[i][1] for i in group) + 1
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            seq = encoded[i][0]
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=min(keep, width),
                use_cache=False,
            ).logits.float()
        keep = logits.shape[1]
        targets = ids[:, width - keep + 1 :].to(device)
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, reduction="none"
        )
        for row, i in enumerate(group):
            n = encoded[i][1]
            if n > 0:
                results[i] = Scored(float(token_nll[row, token_nll.shape[1] - n :].sum()), n)
        if on_batch is not None:
            on_batch(len(group))
    return results


def perplexity(mean_nll: float | None) -> float | None:
    """exp(mean NLL per token), None when nothing was scored or it overflows."""
    if mean_nll is None:
        return None
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return None
