"""How close a student is to its teacher's distributions, on held-out rows with stored top-K.

Teacher-forced on the teacher's own answer ids (from the `<stem>.logprobs/` sidecar), after the
prompt rendered with the student's chat template and generation prompt, exactly as
`openkd train --loss soft|mix` builds an example. At each answer position with teacher data:

- KL(teacher || student) over the teacher's top-K tokens plus one "rest" bucket, the loss's
  own definition (`openkd.distill.kd`), at temperature 1 unless asked otherwise;
- top-1 agreement: the student's most likely token is the teacher's most likely token.

Both are averaged over positions (not rows). Rows with no stored log-probabilities are counted
and skipped. Nothing but the student is loaded: the teacher is not needed.

When the teacher's tokenizer differs from the student's (`aligner`), each row is the student's
tokens of the teacher's answer, scored against the targets `openkd.distill.crosstok` gives them,
as training does; the KL and agreement are over the positions with an exact or merged target
(ids on both sides), and `coverage` is their share of the answer tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from openkd.data.logprobs import SidecarReader

if TYPE_CHECKING:
    from openkd.distill.crosstok.aligner import Aligner


@dataclass(frozen=True)
class KLReport:
    rows: int  # rows scored
    positions: int  # answer positions with teacher data
    kl: float | None  # mean KL(teacher || student) per position, nats
    top1_agreement: float | None  # share of positions where the two argmaxes agree
    missing: int  # rows skipped: no stored log-probabilities
    temperature: float = 1.0
    coverage: float | None = None  # across tokenizers: share of answer tokens with a target

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "positions": self.positions,
            "kl": self.kl,
            "top1_agreement": self.top1_agreement,
            "rows_without_logprobs": self.missing,
            "temperature": self.temperature,
            **({} if self.coverage is None else {"aligned_coverage": self.coverage}),
        }


def _aligned_row(aligner: Aligner, row: Any, answer: str | None, eos: int) -> Any:
    """A sidecar row as the student's tokens (+ end of turn) and their targets."""
    from openkd.distill.crosstok.targets import EXACT, MERGED

    aligned = aligner.align(row.token_ids, row.top_ids, row.top_logprobs, answer)
    t = aligned.targets
    valid = np.isfinite(t.logprobs)
    return SimpleNamespace(
        token_ids=np.array([*aligned.student_ids, eos], dtype=np.int64),
        top_ids=np.where(valid, t.ids, t.ids[:, :1]),
        top_logprobs=t.logprobs,
        valid=valid,
        has=np.isin(t.kind, (EXACT, MERGED)) & valid.any(-1),
    )


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
    aligner: Aligner | None = None,
) -> KLReport:
    """Score `model` on `rows` (openkd records: `id` and `prompt`) against `reader`'s top-K.

    With `aligner` (the tokenizers differ) a row's `answer` text, if given, is checked against
    the teacher's ids (`openkd.distill.crosstok.aligner`).

    `model` is a transformers causal LM (a PEFT model is scored through its base model with
    the adapter active); positions past `max_length` are not scored.
    """
    import torch

    from openkd.chat import prompt_ids
    from openkd.distill.kd import chunked_kd_loss, logit_transform

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    transform = logit_transform(base.config)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    totals: dict[str, Any] = {"rows": 0, "positions": 0, "kl": 0.0, "agree": 0, "missing": 0}
    totals["answer"] = 0  # answer positions scored (the coverage's denominator)

    def score(batch: list[tuple[list[int], int, Any]]) -> None:
        length = max(len(ids) for ids, _, _ in batch)
        k = batch[0][2].top_ids.shape[1]
        input_ids = torch.zeros((len(batch), length), dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        top_ids = torch.zeros((len(batch), length, k), dtype=torch.long)
        top_lp = torch.zeros((len(batch), length, k), dtype=torch.float32)
        has = torch.zeros((len(batch), length), dtype=torch.bool)
        valid = torch.ones((len(batch), length, k), dtype=torch.bool)
        for b, (ids, start, row) in enumerate(batch):
            n = min(len(row.token_ids), len(ids) - start)
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, : len(ids)] = 1
            labels[b, start : start + n] = torch.tensor(ids[start : start + n])
            top_ids[b, start : start + n] = torch.from_numpy(row.top_ids[:n].astype("int64"))
            top_lp[b, start : start + n] = torch.from_numpy(row.top_logprobs[:n])
            has[b, start : start + n] = torch.from_numpy(getattr(row, "has", np.ones(n, bool))[:n])
            if aligner is not None:
                valid[b, start : start + n] = torch.from_numpy(row.valid[:n])
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
                has[:, 1:].to(device)[mask],
                alpha=0.0,
                temperature=temperature,
                chunk=chunk,
                transform=transform,
                valid=None if aligner is None else valid[:, 1:].to(device)[mask],
            )
        totals["rows"] += len(batch)
        totals["positions"] += int(sums.teacher_positions)
        totals["kl"] += float(sums.kl)
        totals["agree"] += int(sums.agree)
        totals["answer"] += int(mask.sum())

    pending: list[tuple[list[int], int, Any]] = []
    try:
        for record in rows:
            row = reader.get(record["id"])
            if row is None:
                totals["missing"] += 1
                continue
            prompt = prompt_ids(tokenizer, record["prompt"])
            if aligner is not None:
                row = _aligned_row(aligner, row, record.get("answer"), aligner.student_eos)
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
        coverage=None if aligner is None else positions / max(totals["answer"], 1),
    )
