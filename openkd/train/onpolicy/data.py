"""The prompts an on-policy run samples from: an `openkd generate` output or any prompt dataset.

A `prompt` column of chat messages (what `openkd generate` writes) is used as is; a text
`prompt` column becomes one user message. The answers (`completion`) are read only when
`--kd-lambda` below 1 asks for offline steps; then the rows are checked and filtered as for
hard labels (unfinished and empty answers set aside unless `--keep-truncated`).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from openkd.data.teacher import read_teacher
from openkd.errors import OpenkdError
from openkd.train.data import Filtered, TrainData, load_rows, split_eval

if TYPE_CHECKING:
    from datasets import Dataset

    from openkd.train.config import TrainConfig
    from openkd.train.trainer import PreparedStats

NEEDS = "a `prompt` column of text or of chat messages (an `openkd generate` output has one)"


def _as_messages(batch: dict[str, list]) -> dict[str, list]:
    prompts = []
    for value in batch["prompt"]:
        if isinstance(value, str):
            prompts.append([{"role": "user", "content": value}])
        else:
            prompts.append([{"role": m["role"], "content": m["content"]} for m in value])
    return {"prompt": prompts}


def _check_prompt_column(rows: Dataset, spec: str, flag: str) -> None:
    if "prompt" not in rows.column_names:
        raise OpenkdError(
            f"{flag} {spec} has no 'prompt' column (columns: {', '.join(rows.column_names)}); "
            f"--loss on-policy samples answers to prompts: pass a dataset with {NEEDS}"
        )
    first = rows[0]["prompt"]
    ok = isinstance(first, str) or (
        isinstance(first, list)
        and bool(first)
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in first)
    )
    if not ok or not first:
        raise OpenkdError(
            f"{flag} {spec}: the first row's prompt is {type(first).__name__} "
            f"{str(first)[:80]!r}; --loss on-policy needs {NEEDS}"
        )


def _prompts(spec: str, flag: str, cfg: TrainConfig) -> tuple[Dataset, Filtered]:
    """One dataset's rows: prompts as messages, answers too when offline steps need them."""
    from openkd.train.data import _usable_rows

    offline = cfg.lmbda < 1.0
    if offline:
        rows, filtered = _usable_rows(spec, flag, cfg.keep_truncated)
    else:
        rows = load_rows(spec, flag)
        filtered = Filtered(rows=len(rows), truncated=0, empty=0, kept_incomplete=False)
    _check_prompt_column(rows, spec, flag)
    keep = (
        ["prompt"]
        + (["completion"] if offline else [])
        + (["id"] if "id" in rows.column_names else [])
    )
    rows = rows.select_columns(keep).map(
        _as_messages, batched=True, keep_in_memory=True, desc="Reading prompts"
    )
    return rows, filtered


def fingerprint(datasets: list[Dataset | None]) -> str:
    """A content hash of the prompts (and answers, when read) trained on and held out."""
    digest = hashlib.sha256()
    for part, ds in enumerate(datasets):
        digest.update(f"|part{part}|".encode())
        if ds is None:
            continue
        columns = [c for c in ("prompt", "completion") if c in ds.column_names]
        for batch in ds.select_columns(columns).iter(batch_size=1_000):
            for row in zip(*(batch[c] for c in columns), strict=True):
                digest.update(json.dumps(row, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:32]


def load_prompt_data(cfg: TrainConfig) -> TrainData:
    """The rows an on-policy run samples from, split as `openkd train` splits hard labels."""
    rows, filtered = _prompts(cfg.dataset, "--dataset", cfg)
    if cfg.max_samples is not None and cfg.max_samples < len(rows):
        rows = rows.select(range(cfg.max_samples))
    train, held_out = split_eval(rows, cfg.eval_fraction, cfg.seed)
    if cfg.eval_dataset:
        held_out, _ = _prompts(cfg.eval_dataset, "--eval-dataset", cfg)
    return TrainData(
        train=train,
        eval=held_out,
        filtered=filtered,
        fingerprint=fingerprint([train, held_out]),
        teacher=read_teacher(cfg.dataset),
    )


def answer_text(row: dict[str, Any]) -> str:
    return "".join(m["content"] for m in row.get("completion") or [])


def fit_prompts(
    dataset: Any, tokenizer: Any, budget: int, name: str, max_length: int
) -> tuple[Any, PreparedStats]:
    """Drop prompts longer than `budget` tokens (rendered with the generation prompt): TRL does
    not cut prompts, and one that leaves no room for `--max-completion-length` cannot train."""
    from openkd.train.trainer import PreparedStats

    def lengths(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer.apply_chat_template(
            batch["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return {"_prompt_tokens": [len(ids) for ids in encoded["input_ids"]]}

    rows_in = len(dataset)
    measured = dataset.map(lengths, batched=True, desc=f"Measuring {name} prompts")
    fits = [i for i, n in enumerate(measured["_prompt_tokens"]) if n <= budget]
    if not fits:
        raise OpenkdError(
            f"every {name} prompt is longer than --max-length {max_length} minus "
            f"--max-completion-length {max_length - budget} ({budget} tokens; shortest "
            f"prompt {min(measured['_prompt_tokens'])}); raise --max-length or lower "
            "--max-completion-length"
        )
    kept = measured.select(fits) if len(fits) < rows_in else measured
    stats = PreparedStats(
        rows_in=rows_in,
        examples=len(kept),
        tokens=int(sum(kept["_prompt_tokens"])),
        trained_tokens=0,
        cut=0,
        trimmed=0,
    )
    return kept.remove_columns("_prompt_tokens"), stats


def fit_datasets(
    kwargs: dict[str, Any], max_length: int, wrap: Any = None
) -> dict[str, PreparedStats]:
    """`fit_prompts` on a trainer's train and eval datasets, in its keyword arguments (then
    `wrap`ped); the budget is `max_length` less the config's `max_completion_length`."""
    budget = max_length - kwargs["args"].max_completion_length
    prepared = {}
    for key, name in (("train_dataset", "train"), ("eval_dataset", "eval")):
        if kwargs.get(key) is not None:
            fitted, prepared[name] = fit_prompts(
                kwargs[key], kwargs["processing_class"], budget, name, max_length
            )
            kwargs[key] = wrap(fitted) if wrap else fitted
    return prepared
