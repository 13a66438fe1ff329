"""Read the held-out set: prompts, the teacher's recorded answers, gold answers if any.

The default input is the `<stem>.eval.jsonl` that `openkd generate` wrote (openkd records),
but any dataset with a prompt column works: references come from `--reference-column` or
from a live `--teacher`. Decoding defaults come from the teacher's `<stem>.meta.json`, so the
student answers under the same token limit and stop strings as the teacher did.
"""

from __future__ import annotations

import json
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


def meta_path(dataset: str | None) -> Path | None:
    """`<stem>.meta.json` beside an `openkd generate` output or one of its side files."""
    if dataset is None:
        return None
    path = Path(os.path.expanduser(dataset))
    return OutputFiles.of_file(path).meta if path.is_file() else None


def read_decoding(cfg: EvalConfig) -> tuple[Decoding, GenerateMeta | None]:
    """Flags first, then the generate run's metadata, then defaults."""
    path = meta_path(cfg.dataset)
    meta = _read_meta(path) if path is not None else None
    sampling = meta.sampling if meta else {}
    max_new = cfg.max_new_tokens or sampling.get("max_new_tokens")
    stop = cfg.stop if cfg.stop is not None else sampling.get("stop") or []
    if path is not None and cfg.max_new_tokens is None:
        _check_value(path, "max_new_tokens", max_new, "a positive whole number", _positive_int)
    if path is not None and cfg.stop is None:
        _check_value(path, "stop", stop, "a list of strings", _text_list)
    if cfg.max_new_tokens:
        source = "--max-new-tokens"
    elif max_new:
        source = str(path)
    else:
        source = "default"
    return Decoding(int(max_new or DEFAULT_MAX_NEW_TOKENS), tuple(stop), source), meta


def _read_meta(path: Path) -> GenerateMeta | None:
    try:
        return GenerateMeta.read(path)
    except (TypeError, ValueError, AttributeError) as exc:  # a hand-edited layout
        raise OpenkdError(
            f"{path} is not openkd metadata ({type(exc).__name__}: {exc}); restore or fix the file"
        ) from exc


def _positive_int(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


def _text_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_value(path: Path, key: str, value: Any, want: str, valid: Any) -> None:
    """The teacher's decoding read from its metadata must be usable, or name the file and key."""
    if not valid(value):
        flag = "--" + key.replace("_", "-")
        raise OpenkdError(
            f"{path}: sampling.{key} is {json.dumps(value)}, not {want}; fix that key in the "
            f"file, or pass {flag} to set it for this eval"
        )


def has_reference(text: str | None) -> bool:
    """An empty or missing teacher answer is nothing to compare with: it never matches."""
    return bool(text and text.strip())


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
    assert cfg.dataset is not None  # agreement mode always has one (EvalConfig)
    dataset = load_source(cfg.dataset, split=cfg.split, subset=cfg.subset)
    columns = list(dataset.column_names)
    builder = PromptBuilder(
        columns=columns,
        source=cfg.dataset,
        prompt_column=cfg.prompt_column,
        system_prompt=cfg.system_prompt,
        alternatives="",  # eval has no --messages-column or --prompt-template
    )
    if cfg.teacher is None and cfg.reference_column not in columns:
        gold = cfg.answer_column in columns
        raise OpenkdError(
            f"--dataset {cfg.dataset} has no column '{cfg.reference_column}' with the teacher's "
            + ("answers" if gold else f"answers, nor '{cfg.answer_column}' with gold answers")
            + f" (columns: {', '.join(columns[:20])}); pass --reference-column NAME, "
            + ("--mode benchmark to score its gold answers" if gold else "--answer-column NAME")
            + " (final-answer accuracy, no teacher needed), or --teacher MODEL to have the "
            "teacher answer now"
        )
    extra = [cfg.reference_column, "finish_reason", "id", cfg.answer_column]
    # One column may serve two options (--reference-column answer, the gold column too).
    wanted = list(dict.fromkeys([*builder.columns, *(c for c in extra if c in columns)]))
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


def with_references(cfg: EvalConfig, examples: list[Example]) -> tuple[list[Example], int]:
    """The examples that have a recorded teacher answer, and how many do not (left out of every
    score); OpenkdError when none has one, as the reference column is then the wrong one."""
    kept = [ex for ex in examples if has_reference(ex.reference)]
    if examples and not kept:
        raise OpenkdError(
            f"every row of --dataset {cfg.dataset} has an empty or missing reference in column "
            f"'{cfg.reference_column}', so there is nothing to compare with; pass "
            "--reference-column NAME with the teacher's answers, or --teacher MODEL to have the "
            "teacher answer now"
        )
    return kept, len(examples) - len(kept)
