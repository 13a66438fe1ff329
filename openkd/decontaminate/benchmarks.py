"""Read each benchmark's text columns into one n-gram index."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd.data.sources import BUILDERS, iter_rows, load_source, local_files
from openkd.decontaminate.config import Benchmark
from openkd.decontaminate.ngrams import NgramIndex
from openkd.errors import OpenkdError, brief
from openkd.paths import looks_like_path

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class BenchmarkStats:
    """What one benchmark contributed: its rows, its n-grams, its texts too short to match."""

    name: str
    source: str
    columns: list[str]
    split: str | None
    rows: int = 0
    ngrams: int = 0
    short: int = 0


def build_index(benchmarks: list[Benchmark], n: int) -> tuple[NgramIndex, list[BenchmarkStats]]:
    """All benchmarks' n-grams in one index (each n-gram points at its first benchmark row)."""
    index = NgramIndex(n)
    stats = []
    for position, bench in enumerate(benchmarks):
        dataset, split = load_benchmark(bench)
        missing = [c for c in bench.columns if c not in dataset.column_names]
        if missing:
            raise OpenkdError(
                f"--benchmark {bench.label} has no column {', '.join(map(repr, missing))} "
                f"(columns are: {', '.join(dataset.column_names[:30])}); name the text columns "
                f"as {bench.source}:COLUMN[,COLUMN]"
            )
        stat = BenchmarkStats(bench.label, bench.source, list(bench.columns), split)
        before = len(index)
        for row_index, texts in _texts(dataset, bench.columns):
            lengths = [index.add(text, position, row_index) for text in texts]
            stat.rows += 1
            stat.short += max(lengths, default=0) < n
        stat.ngrams = len(index) - before
        stats.append(stat)
    return index, stats


def _texts(dataset: Dataset, columns: list[str]) -> Iterator[tuple[int, list[str]]]:
    for rows in iter_rows(dataset, range(len(dataset)), columns, batch_size=4096):
        for row_index, row in rows:
            yield row_index, [t for c in columns for t in _as_texts(row[c])]


def _as_texts(value: Any) -> list[str]:
    """A cell as texts: a string, the strings of a list (e.g. answer choices), else nothing."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _as_texts(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _as_texts(v)]
    return [] if value is None else [str(value)]


def load_benchmark(bench: Benchmark) -> tuple[Dataset, str | None]:
    """The benchmark's rows and the split they came from (None for plain files)."""
    local = Path(bench.source).suffix.lower() in BUILDERS or looks_like_path(bench.source)
    if local or local_files(bench.source) is not None:
        if not local_files(bench.source):
            raise OpenkdError(
                f"--benchmark {bench.label}: no such file or directory (or no file matches); "
                "check the path"
            )
        dataset = load_source(
            bench.source,
            split=bench.split or "train",
            subset=bench.subset,
            flag="--benchmark",
            empty_hint="point it at the benchmark's problems",
            split_flag="its SPLIT",
            subset_flag="its SUBSET",
        )
        return dataset, bench.split
    return _load_hub(bench)


def _load_hub(bench: Benchmark) -> tuple[Dataset, str]:
    from datasets import DatasetDict, load_dataset

    try:
        loaded = load_dataset(bench.source, bench.subset, split=bench.split)
    except Exception as exc:
        raise OpenkdError(
            f"--benchmark {bench.label}: could not load it from the Hub ({brief(exc)}); check "
            "the id, split and subset, your network, and `hf auth login` for gated datasets"
        ) from exc
    if not isinstance(loaded, DatasetDict):
        return loaded, str(bench.split)
    splits = list(loaded)
    if len(splits) == 1:
        return loaded[splits[0]], splits[0]
    if "test" in loaded:
        return loaded["test"], "test"
    raise OpenkdError(
        f"--benchmark {bench.label} has splits {', '.join(splits)}; name one: "
        f"{bench.source}:{','.join(bench.columns)}:SPLIT"
    )
