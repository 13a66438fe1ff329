"""How close a student is to its teacher's distributions, on held-out rows with stored top-K.

Teacher-forced on the teacher's own answer ids (from the `<stem>.logprobs/` sidecar), after the
prompt rendered with the student's chat template and generation prompt, exactly as
`openkd train --loss soft|mix` builds an example. At each answer position with teacher data:

- KL(teacher || student) over the teacher's top-K tokens plus one "rest" bucket, the loss's
  own definition (`openkd.train.kd`), at temperature 1 unless asked otherwise;
- top-1 agreement: the student's most likely token is the teacher's most likely token.

Both are averaged over positions (not rows). Rows with no stored log-probabilities are counted
and skipped. Nothing but the student is loaded: the teacher is not needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from openkd.data.logprobs import SidecarReader


@dataclass(frozen=True)
class KLReport:
    rows: int  # rows scored
    positions: int  # answer positions with teacher data
    kl: float | None  # mean KL(teacher || student) per position, nats
    top1_agreement: float | None  # share of positions where the two argmaxes agree
    missing: int  # rows skipped: no stored log-probabilities
    temperature: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "positions": self.positions,
            "kl": self.kl,
            "top1_agreement": self.top1_agreement,
            "rows_without_logprobs": self.missing,
            "temperature": self.temperature,
        }


def teacher_student_kl(
    model: Any,
    tokenizer: Any,
    rows: Iterable[dict[str, Any]],
    reader: SidecarReader,
    *,
    max_length: int = 4096,
    batch_size: int = 8,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> KLReport:
    """Score `model` on `rows` (openkd records: `id` and `prompt`) against `reader`'s top-K.

    `model` is a transformers causal LM (a PEFT model is scored through its base model with
    the adapter active); positions past `max_length` are not scored.
    """
    import torch

    from openkd.train.kd import chunked_kd_loss, logit_transform
    from openkd.train.soft import prompt_ids

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    transform = logit_transform(base.config)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    totals: dict[str, Any] = {"rows": 0, "positions": 0, "kl": 0.0, "agree": 0, "missing": 0}

    def score(batch: list[tuple[list[int], int, Any]]) -> None:
        length = max(len(ids) for ids, _, _ in batch)
        k = batch[0][2].top_ids.shape[1]
        input_ids = torch.zeros((len(batch), length), dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        top_ids = torch.zeros((len(batch), length, k), dtype=torch.long)
        top_lp = torch.zeros((len(batch), length, k), dtype=torch.float32)
        for b, (ids, start, row) in enumerate(batch):
            n = min(len(row.token_ids), len(ids) - start)
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, : len(ids)] = 1
            labels[b, start : start + n] = torch.tensor(ids[start : start + n])
            top_ids[b, start : start + n] = torch.from_numpy(row.top_ids[:n].astype("int64"))
            top_lp[b, start : start + n] = torch.from_numpy(row.top_logprobs[:n])
        with torch.inference_mode():
            hidden = base.base_model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device)
            ).last_hidden_state[:, :-1]
            shifted = labels[:, 1:].to(device)
            mask = shifted != -100
            head = base.get_output_embeddings()
            sums = chunked_kd_loss(
                hidden[mask],
                head.weight,
                head.bias,
                shifted[mask],
                top_ids[:, 1:].to(device)[mask],
                top_lp[:, 1:].to(device)[mask],
                torch.ones(int(mask.sum()), dtype=torch.bool, device=device),
                alpha=0.0,
                temperature=temperature,
                chunk=chunk,
                transform=transform,
            )
        totals["rows"] += len(batch)
        totals["positions"] += int(sums.teacher_positions)
        totals["kl"] += float(sums.kl)
        totals["agree"] += int(sums.agree)

    pending: list[tuple[list[int], int, Any]] = []
    try:
        for record in rows:
            row = reader.get(record["id"])
            if row is None:
                totals["missing"] += 1
                continue
            prompt = prompt_ids(tokenizer, record["prompt"])
            ids = (prompt + [int(t) for t in row.token_ids])[:max_length]
            if len(ids) <= len(prompt):
                continue  # the prompt fills max_length: nothing to score
            pending.append((ids, len(prompt), row))
            if len(pending) == batch_size:
                score(pending)
                pending = []
        if pending:
            score(pending)
    finally:
        base.train(was_training)
    positions = totals["positions"]
    return KLReport(
        rows=totals["rows"],
        positions=positions,
        kl=totals["kl"] / positions if positions else None,
        top1_agreement=totals["agree"] / positions if positions else None,
        missing=totals["missing"],
        temperature=temperature,
    )
