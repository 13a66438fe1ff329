"""`openkd decontaminate`: keep the prompts that share no n-gram with any benchmark.

setup (check the output, index the benchmarks, open the dataset, build the prompts' reader)
-> stream the dataset a chunk at a time, sorting each row into kept or contaminated
-> rename both files into place, write <stem>.meta.json, print the summary.

Memory is the benchmarks' n-gram index (small: ~30k n-grams for 500 problems) plus one chunk of
rows; the dataset itself stays memory-mapped Arrow.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from openkd import __version__, console
from openkd.data.jsonl import AtomicWriter, write_text_atomic
from openkd.data.sources import iter_rows, load_prompts
from openkd.decontaminate.benchmarks import build_index
from openkd.decontaminate.config import DecontaminateConfig
from openkd.errors import OpenkdError
from openkd.paths import check_writable

FORMAT = "openkd.decontaminate/1"
CHUNK_ROWS = 2048
NORMALISATION = (
    "NFKC, case-folded; every run of characters that is not a letter or digit separates words"
)


def side_files(output: Path) -> tuple[Path, Path]:
    """(<stem>.contaminated.jsonl, <stem>.meta.json) beside `output`."""
    stem = output.with_suffix("")
    return stem.with_name(stem.name + ".contaminated.jsonl"), stem.with_name(
        stem.name + ".meta.json"
    )


def run(cfg: DecontaminateConfig) -> None:
    started = time.monotonic()
    output = cfg.output
    contaminated, meta_path = side_files(output)
    _check_output(cfg)
    # Benchmarks first: they are small, so a wrong one fails before a large dataset is read.
    index, benchmarks = build_index(cfg.benchmark, cfg.ngram_size)
    prompts = load_prompts(cfg)
    dataset, builder = prompts.dataset, prompts.builder
    for b in benchmarks:
        if b.short:
            console.warn(
                f"--benchmark {b.name}: {b.short:,} of {b.rows:,} rows have fewer than "
                f"{cfg.ngram_size} words and can never match; lower --ngram-size to catch them"
            )
    console.info(
        f"decontaminating {len(dataset):,} rows of {cfg.dataset} against {len(benchmarks)} "
        f"benchmark(s): {len(index):,} distinct {cfg.ngram_size}-grams"
    )
    kept = 0
    dropped: Counter[str] = Counter()
    unchecked = 0
    first_unchecked: int | None = None
    with (
        AtomicWriter(output) as keep_fh,
        AtomicWriter(contaminated) as drop_fh,
        _progress(len(dataset)) as advance,
    ):
        for chunk in iter_rows(
            dataset, range(len(dataset)), list(dataset.column_names), CHUNK_ROWS
        ):
            for position, row in chunk:
                try:
                    texts = [m["content"] for m in builder.build(row, position)]
                except OpenkdError:  # no prompt text (null, empty): nothing to match, kept
                    unchecked += 1
                    first_unchecked = position if first_unchecked is None else first_unchecked
                    texts = []
                match = index.first_match(texts)
                if match is None:
                    keep_fh.write(_line(row))
                    kept += 1
                    continue
                bench = benchmarks[match.benchmark]
                dropped[bench.name] += 1
                drop_fh.write(
                    _line(
                        {
                            "benchmark": bench.name,
                            "benchmark_row": match.row,
                            "ngram": match.ngram,
                            "source_index": position,
                            "row": row,
                        }
                    )
                )
            advance(len(chunk))
    seconds = time.monotonic() - started
    rows = len(dataset)
    meta = {
        "format": FORMAT,
        "openkd": __version__,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": cfg.dataset,
        "ngram_size": cfg.ngram_size,
        "normalisation": NORMALISATION,
        "benchmarks": [{**asdict(b), "dropped": dropped.get(b.name, 0)} for b in benchmarks],
        "counts": {
            "rows": rows,
            "kept": kept,
            "dropped": sum(dropped.values()),
            "unchecked": unchecked,
        },
        "seconds": round(seconds, 3),
        "files": {"kept": output.name, "contaminated": contaminated.name},
        "config": cfg.to_yaml_dict(),
    }
    write_text_atomic(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if unchecked:
        console.warn(
            f"rows without prompt text to check: {unchecked:,} (the first is row "
            f"{first_unchecked}); they are kept"
        )
    summary = [
        ("rows in", console.fmt_int(rows)),
        ("kept", console.fmt_int(kept)),
        *[(f"dropped: {b.name}", console.fmt_int(dropped.get(b.name, 0))) for b in benchmarks],
        ("n-gram size", str(cfg.ngram_size)),
        ("time", f"{seconds:.1f} s ({console.fmt_rate(rows / max(seconds, 1e-9))} rows/s)"),
    ]
    console.summary_table(f"openkd decontaminate: {output}", summary)
    console.stdout_line(str(output))


def _check_output(cfg: DecontaminateConfig) -> None:
    output = cfg.output
    if output.exists() and not cfg.overwrite:
        raise OpenkdError(
            f"--output {output} already exists; pass --overwrite to replace it, or another --output"
        )
    if output.is_dir():
        raise OpenkdError(f"--output {output} is a directory; pass a .jsonl file path")
    check_writable(output, "--output")
    source = Path(cfg.dataset).expanduser()
    if source.is_file() and source.resolve() == output.resolve():
        raise OpenkdError(
            f"--output {output} is the --dataset itself; write the kept rows to another file"
        )


def _line(row: dict[str, Any]) -> str:
    # default=str: Arrow dates and decimals become text instead of failing the whole run.
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """Yields `advance(rows)` of a transient bar: the summary table is what stays."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("checking prompts"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console.console, transient=True) as progress:
        task = progress.add_task("check", total=total)
        yield lambda rows: progress.update(task, advance=rows)
