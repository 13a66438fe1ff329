"""Read the held-out set: prompts, the teacher's recorded answers, gold answers if any.

The default input is the `<stem>.eval.jsonl` that `openkd generate` wrote (openkd records),
but any dataset with a prompt column works: references come from `--reference-column` or
from a live `--teacher`. Decoding defaults come from the teacher's `<stem>.meta.json`, so the
student answers under the same token limit and stop strings as the teacher did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openkd.data.layout import OutputFiles
from openkd.data.metadata import GenerateMeta
from openkd.data.prompts import PromptBuilder
from openkd.data.schema import Message
from openkd.data.sources import iter_rows, load_source, selection
from openkd.errors import OpenkdError
from openkd.eval.config import DEFAULT_MAX_NEW_TOKENS, EvalConfig


@dataclass(frozen=True)
class Example:
    id: str
    prompt: list[Message]
    reference: str | None
    reference_finish: str | None
    gold: str | None


@dataclass(frozen=True)
class Decoding:
    """The teacher's decoding, applied to every model scored."""

    max_new_tokens: int
    stop: tuple[str, ...]
    source: str  # where the values came from, shown to the user


def meta_path(dataset: str) -> Path | None:
    """`<stem>.meta.json` beside an `openkd generate` output or one of its side files."""
    path = Path(os.path.expanduser(dataset))
    return OutputFiles.of_file(path).meta if path.is_file() else None


def read_decoding(cfg: EvalConfig) -> tuple[Decoding, GenerateMeta | None]:
    """Flags first, then the generate run's metadata, then defaults."""
    path = meta_path(cfg.dataset)
    meta = GenerateMeta.read(path) if path is not None else None
    sampling = meta.sampling if meta else {}
    max_new = cfg.max_new_tokens or sampling.get("max_new_tokens")
    stop = cfg.stop if cfg.stop is not None else sampling.get("stop") or []
    if cfg.max_new_tokens:
        source = "--max-new-tokens"
    elif max_new:
        source = str(path)
    else:
        source = "default"
    return Decoding(int(max_new or DEFAULT_MAX_NEW_TOKENS), tuple(stop), source), meta


def answer_text(value: Any) -> str | None:
    """An answer as text: a string, or the assistant turns of a chat list joined."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [
            m.get("content") or ""
            for m in value
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        ]
        return "\n".join(p for p in parts if isinstance(p, str))
    return str(value)


def read_examples(cfg: EvalConfig) -> list[Example]:
    """Every selected row as an Example; OpenkdError naming a missing column and the fix."""
    dataset = load_source(cfg.dataset, split=cfg.split, subset=cfg.subset)
    columns = list(dataset.column_names)
    builder = PromptBuilder(
        columns=columns,
        source=cfg.dataset,
        prompt_column=cfg.prompt_column,
        system_prompt=cfg.system_prompt,
    )
    if cfg.teacher is None and cfg.reference_column not in columns:
        raise OpenkdError(
            f"--dataset {cfg.dataset} has no column '{cfg.reference_column}' with the teacher's "
            f"answers (columns: {', '.join(columns[:20])}); pass --reference-column NAME, or "
            "--teacher MODEL to have the teacher answer now"
        )
    wanted = [*builder.columns]
    extra = [cfg.reference_column, "finish_reason", "id", cfg.answer_column]
    wanted += [c for c in extra if c in columns and c not in wanted]
    positions = selection(len(dataset), max_samples=cfg.max_samples, shuffle_seed=None)
    examples = []
    for rows in iter_rows(dataset, positions, wanted, batch_size=1024):
        for index, row in rows:
            examples.append(_example(cfg, builder, row, index))
    return examples


def _example(cfg: EvalConfig, builder: PromptBuilder, row: dict[str, Any], index: int) -> Example:
    reference = None if cfg.teacher else answer_text(row.get(cfg.reference_column))
    finish = None if cfg.teacher else row.get("finish_reason")
    gold = row.get(cfg.answer_column)
    return Example(
        id=str(row.get("id") or index),
        prompt=builder.build(row, index),
        reference=reference,
        reference_finish=finish,
        gold=None if gold is None else str(gold),
    )
