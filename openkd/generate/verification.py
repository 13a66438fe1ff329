"""After a complete `--verify` pass: how often the teacher was right, and `--keep first-verified`.

Both read the verdicts recorded on the rows (`verification.correct`), so they cover every run
that wrote to the output, not only the last one. A prompt's samples share its `prompt_id`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from openkd.data.jsonl import AtomicWriter, dumps, iter_jsonl

if TYPE_CHECKING:
    from openkd.data.layout import OutputFiles

VERDICT_KINDS = ("train", "eval", "rejected", "truncated")
SUPERSEDED = "a lower-numbered sample of this prompt verified (--keep first-verified)"


def _prompt(row: dict[str, Any]) -> str:
    return str(row.get("prompt_id") or row["id"])


def pass_rates(files: OutputFiles, samples: int) -> dict[str, Any]:
    """pass@1 (the expected share of right answers per prompt, averaged over prompts) and
    pass@N for N = `samples` (the share of prompts with at least one right answer); an answer cut
    at the token limit counts as wrong."""
    right: dict[str, int] = defaultdict(int)
    drawn: dict[str, int] = defaultdict(int)
    for kind in VERDICT_KINDS:
        path = files.kind_path(kind)
        if not path.is_file():
            continue
        for _, row in iter_jsonl(path):
            key = _prompt(row)
            drawn[key] += 1
            right[key] += bool((row.get("verification") or {}).get("correct"))
    prompts = len(drawn)
    answers, verified = sum(drawn.values()), sum(right.values())
    rates: dict[str, Any] = {
        "prompts": prompts,
        "answers": answers,
        "verified": verified,
        "pass@1": round(sum(right[k] / drawn[k] for k in drawn) / prompts, 4) if prompts else None,
    }
    if samples > 1:
        rates[f"pass@{samples}"] = (
            round(sum(right[k] > 0 for k in drawn) / prompts, 4) if prompts else None
        )
    return rates


def keep_first_verified(files: OutputFiles) -> int:
    """Move every verified answer but each prompt's lowest-numbered one from the train and eval
    files to the rejected file (files replaced in one step each); the number moved."""
    first: dict[str, int] = {}
    rows = 0
    for kind in ("train", "eval"):
        path = files.kind_path(kind)
        if path.is_file():
            for _, row in iter_jsonl(path):
                key, sample = _prompt(row), int(row.get("sample") or 0)
                first[key] = min(sample, first.get(key, sample))
                rows += 1
    if rows == len(first):
        return 0  # one answer per prompt already
    moved: list[dict[str, Any]] = []
    for kind in ("train", "eval"):
        path = files.kind_path(kind)
        if not path.is_file():
            continue
        with AtomicWriter(path) as fh:  # replaces the file only if all of it was read
            for _, row in iter_jsonl(path):
                if int(row.get("sample") or 0) == first[_prompt(row)]:
                    fh.write(dumps(row) + "\n")
                else:
                    row["verification"] = {**row.get("verification", {}), "reason": SUPERSEDED}
                    moved.append(row)
    if moved:
        rejected = files.kind_path("rejected")
        old = [row for _, row in iter_jsonl(rejected)] if rejected.is_file() else []
        with AtomicWriter(rejected) as fh:
            fh.writelines(dumps(row) + "\n" for row in [*old, *moved])
    return len(moved)
