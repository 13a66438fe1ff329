"""Read what `openkd generate` wrote, check it is that format, and pick the rows to train on.

`--dataset` is a JSONL file, a directory of JSONL shards, a `save_to_disk` directory or a Hub
dataset id; it is read with `datasets` as is (TRL's conversational prompt/completion format).
In a directory, the side files `openkd generate` writes next to an output
(`*.eval.jsonl`, `*.truncated.jsonl`, `*.failed.jsonl`) are never read as training data.

Rows the teacher did not finish (`finish_reason == "length"`) or answered with nothing are
skipped unless `--keep-truncated`. `--max-samples` keeps the first N rows that remain, before
the `--eval-fraction` hold-out is split off (seeded by `--seed`). Only `prompt` and
`completion` reach the trainer (and `id`, for soft labels). The teacher named on the model
card comes from the `<stem>.meta.json` beside a local dataset, or the `openkd_meta.json`
uploaded with a Hub one (`openkd.data.teacher`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.layout import OutputFiles, is_side_file
from openkd.data.schema import FINISH_LENGTH
from openkd.data.sources import BUILDERS, count_json_lines, load_source, local_files
from openkd.data.teacher import DatasetTeacher, read_teacher
from openkd.errors import OpenkdError
from openkd.paths import looks_like_path

if TYPE_CHECKING:
    from datasets import Dataset

TRAIN_COLUMNS = ["prompt", "completion"]
EXPECTED = (
    "expected rows as `openkd generate` writes them: "
    '{"prompt": [{"role": "user", "content": ...}], '
    '"completion": [{"role": "assistant", "content": ...}], "finish_reason": ...}'
)


@dataclass(frozen=True)
class Filtered:
    """What happened to the rows of one dataset on the way to the trainer."""

    rows: int  # rows read
    truncated: int  # finish_reason == "length" (skipped unless kept)
    empty: int  # empty answers (skipped unless kept)
    kept_incomplete: bool  # --keep-truncated

    @property
    def skipped(self) -> int:
        return 0 if self.kept_incomplete else self.truncated + self.empty


@dataclass(frozen=True)
class TrainData:
    train: Dataset
    eval: Dataset | None
    filtered: Filtered
    fingerprint: str  # identifies the rows trained on (and held out), not where they live
    teacher: DatasetTeacher | None  # from the dataset's `<stem>.meta.json`, if there is one


def load_rows(spec: str, flag: str = "--dataset") -> Dataset:
    """The dataset at `spec` as one `datasets.Dataset`, read as is (no conversion)."""
    return load_source(spec, flag=flag, empty_hint="run `openkd generate` to label prompts first")


def _is_message_list(feature: Any) -> bool:
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and len(feature) == 1:
        inner = feature[0]
    return isinstance(inner, dict) and {"role", "content"} <= set(inner)


def check_schema(dataset: Dataset, spec: str, flag: str = "--dataset") -> None:
    """Raise naming what is wrong unless rows are openkd's conversational prompt/completion."""
    columns = dataset.column_names
    missing = [c for c in TRAIN_COLUMNS if c not in columns]
    if missing:
        raise OpenkdError(
            f"{flag} {spec} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(columns)}); it was not written by `openkd generate`: {EXPECTED}"
        )
    for column in TRAIN_COLUMNS:
        if not _is_message_list(dataset.features[column]):
            raise OpenkdError(
                f"{flag} {spec}: column '{column}' holds {dataset.features[column]}, not a list "
                f"of {{role, content}} messages; {EXPECTED}"
            )
    first = dataset[0]
    if not first["prompt"]:
        raise OpenkdError(f"{flag} {spec}: the first row has an empty prompt; {EXPECTED}")
    roles = [m["role"] for m in first["completion"]]
    if roles != ["assistant"]:
        raise OpenkdError(
            f"{flag} {spec}: the first row's completion has roles {roles}, expected one "
            f"assistant message; {EXPECTED}"
        )


def _is_empty(completion: list[dict[str, Any]] | None) -> bool:
    return not completion or not "".join(m.get("content") or "" for m in completion).strip()


def filter_incomplete(dataset: Dataset, keep: bool) -> tuple[Dataset, Filtered]:
    """Drop unfinished and empty answers (unless `keep`), counting each kind."""
    has_reason = "finish_reason" in dataset.column_names
    columns = ["completion", "finish_reason"] if has_reason else ["completion"]

    def flags(batch: dict[str, list]) -> dict[str, list]:
        reasons = batch.get("finish_reason") or [None] * len(batch["completion"])
        return {
            "_truncated": [r == FINISH_LENGTH for r in reasons],
            "_empty": [_is_empty(c) for c in batch["completion"]],
        }

    marked = dataset.select_columns(columns).map(
        flags, batched=True, remove_columns=columns, keep_in_memory=True, desc="Checking answers"
    )
    truncated_flags, empty_flags = marked["_truncated"], marked["_empty"]
    # An empty answer cut at the limit counts once, as truncated.
    truncated = sum(truncated_flags)
    empty = sum(e and not t for t, e in zip(truncated_flags, empty_flags, strict=True))
    stats = Filtered(rows=len(dataset), truncated=truncated, empty=empty, kept_incomplete=keep)
    if keep or not (truncated or empty):
        return dataset, stats
    keep_idx = [
        i for i, (t, e) in enumerate(zip(truncated_flags, empty_flags, strict=True)) if not (t or e)
    ]
    return dataset.select(keep_idx), stats


def fingerprint(datasets: list[Dataset | None]) -> str:
    """A content hash of the rows used: their ids when present, else their prompt/completion."""
    digest = hashlib.sha256()
    for part, ds in enumerate(datasets):
        digest.update(f"|part{part}|".encode())
        if ds is None:
            continue
        if "id" in ds.column_names:
            for batch in ds.select_columns(["id"]).iter(batch_size=10_000):
                digest.update("\n".join(map(str, batch["id"])).encode("utf-8"))
        else:
            for batch in ds.select_columns(TRAIN_COLUMNS).iter(batch_size=1_000):
                for p, c in zip(batch["prompt"], batch["completion"], strict=True):
                    digest.update(json.dumps([p, c], sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:32]


def split_eval(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out `fraction` of the rows (at least one), chosen with `seed`."""
    if not fraction:
        return dataset, None
    n_eval = max(1, round(len(dataset) * fraction))
    if n_eval >= len(dataset):
        raise OpenkdError(
            f"--eval-fraction {fraction} of {len(dataset)} rows leaves nothing to train on; "
            "lower it or pass a separate --eval-dataset"
        )
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _set_aside(data_files: list[Path]) -> list[str]:
    """What `openkd generate` put beside `data_files` instead of into them, in words."""
    counts: dict[str, tuple[int, Path]] = {}
    for file in data_files:
        outputs = OutputFiles.of_file(file)
        for kind in ("truncated", "rejected", "failed"):
            side = outputs.kind_path(kind)
            if side.is_file() and (n := count_json_lines(side)):
                total, first = counts.get(kind, (0, side))
                counts[kind] = (total + n, first)
    what = {
        "truncated": "truncated or empty answer(s) set aside in {path} (regenerate with a larger "
        "--max-new-tokens, or with --keep-truncated to keep them)",
        "rejected": "answer(s) that failed --verify set aside in {path}",
        "failed": "prompt(s) the teacher failed on, in {path} (rerun generate to retry them)",
    }
    return [f"{n} {what[kind].format(path=path)}" for kind, (n, path) in counts.items()]


def _empty_files(spec: str, flag: str) -> OpenkdError | None:
    """The error for a local dataset whose JSON(L) files are all empty, saying why; else None."""
    data = [
        f
        for f in local_files(spec) or []
        if f.suffix.lower() in BUILDERS
        and not is_side_file(f)
        and not f.name.endswith(".meta.json")
    ]
    if not data or any(f.suffix.lower() != ".jsonl" for f in data):
        return None
    if any(count_json_lines(f) for f in data):
        return None
    why = _set_aside(data) or [
        "did generate reject every answer? see "
        f"{OutputFiles.of_file(data[0]).kind_path('rejected')}"
    ]
    what = "the file is empty" if len(data) == 1 else "its files are empty"
    return OpenkdError(f"0 usable rows in {flag} {spec}: {what}; {'; '.join(why)}")


def _usable_rows(spec: str, flag: str, keep_truncated: bool) -> tuple[Dataset, Filtered]:
    """The rows of `spec` a student can learn from: read, format-checked, unfinished dropped."""
    empty = _empty_files(spec, flag)
    if empty is not None:
        raise empty
    rows = load_rows(spec, flag)
    check_schema(rows, spec, flag)
    rows, filtered = filter_incomplete(rows, keep_truncated)
    if len(rows) == 0:
        raise OpenkdError(
            f"0 usable rows in {flag} {spec}: all {filtered.rows} rows were filtered out "
            f"({filtered.truncated} truncated at the teacher's token limit, {filtered.empty} "
            "empty answers); pass --keep-truncated to train on them anyway, or regenerate with "
            "a larger --max-new-tokens"
        )
    return rows, filtered


def _same_source(a: str, b: str) -> bool:
    if looks_like_path(a) and looks_like_path(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def load_train_data(
    dataset: str,
    *,
    eval_dataset: str | None,
    eval_fraction: float,
    keep_truncated: bool,
    max_samples: int | None,
    seed: int,
    keep_ids: bool = False,
) -> TrainData:
    """Everything `openkd train` reads from disk, checked, filtered and split.

    `keep_ids` keeps the `id` column too (soft labels look the teacher's data up by id).
    """
    rows, filtered = _usable_rows(dataset, "--dataset", keep_truncated)
    if max_samples is not None and max_samples < len(rows):
        rows = rows.select(range(max_samples))
    train, held_out = split_eval(rows, eval_fraction, seed)
    if eval_dataset:
        if _same_source(dataset, eval_dataset):
            console.warn(
                f"--eval-dataset {eval_dataset} is --dataset: the eval loss is then measured on "
                "training rows and says nothing about unseen prompts; pass the <stem>.eval.jsonl "
                "that `openkd generate --eval-fraction` wrote, or use --eval-fraction"
            )
        held_out, _ = _usable_rows(eval_dataset, "--eval-dataset", keep_truncated)

    def columns(ds: Dataset) -> list[str]:
        return [*TRAIN_COLUMNS, "id"] if keep_ids and "id" in ds.column_names else TRAIN_COLUMNS

    return TrainData(
        train=train.select_columns(columns(train)),
        eval=held_out.select_columns(columns(held_out)) if held_out is not None else None,
        filtered=filtered,
        fingerprint=fingerprint([train, held_out]),
        teacher=read_teacher(dataset),
    )
