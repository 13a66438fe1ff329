"""Pipeline overhead: `openkd generate --backend mock` (zero latency) on 100k and 1M prompts.

With a teacher that answers instantly, all that is left is openkd: reading the dataset, ids,
resume bookkeeping, writing and committing rows. Rows/s must not fall and the memory openkd
allocates must not grow with the number of prompts (prompts are streamed from the Arrow table,
never all held).

Memory is judged by peak anonymous memory (RssAnon), not RSS: `datasets` memory-maps its Arrow
copy of the dataset and touches every page while loading it, so RSS also holds about the Arrow
file's size in file-backed page cache (RssFile), which the kernel can drop at any time and which
grows with the dataset on disk, not with openkd's state. The JSON -> Arrow conversion is done
by `datasets` in a separate process before each measured run (measured too, as context): done
inside the run, its transient buffers set the run's peak anonymous memory (it allocates more
the larger the file) and hide openkd's own.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from bench.context import Context
from bench.results import INFO, Result, Target

NAME = "generate_mock"
SIZES = (100_000, 1_000_000)
# Runs per size; the median counts. The 100k run takes a few seconds, most of them start-up, so
# its wall time is the noisiest figure here (6.2-8.7 s over three runs); the 1M run takes ~50 s.
# Peak RssAnon barely moves at either size (110-111 MiB at 100k, 122 MiB at 1M, on this machine).
REPEATS = {100_000: 3, 1_000_000: 1}
METHOD = (
    "`openkd generate --backend mock --mock-latency 0` (its defaults: answers are committed "
    "every --commit-interval second) on 100k and 1M distinct prompts. Before each size the "
    "datasets cache is emptied and the JSONL is converted to Arrow by openkd's own loader "
    "(`openkd.data.sources.load_source`) in a separate process; the measured run then finds the "
    "cache warm (checked: it adds nothing to the cache). Why: measured inside the run (a cold "
    "cache), datasets' JSON -> Arrow conversion sets the peak anonymous memory (measured on the "
    "2-core bench machine: 156 MiB at 100k and 202 MiB at 1M cold, vs 110 and 122 MiB warm; the "
    "conversion alone peaked at 151 and 199 MiB), so a cold run measures datasets, not openkd; "
    "the conversion takes about 2 s of the 1M run. rows/s = rows / wall time of the whole measured process (start-up, "
    "dataset load, planning, labelling, writing), and the same ratio per CPU second in the note "
    "(steadier on a busy machine). Memory of the openkd process, sampled every 10 ms from "
    "/proc/<pid>/status by bench/proc.py's wrapper: peak RssAnon (what it allocates itself) is "
    "the flatness figure; peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`) is shown too, with "
    "peak RssFile: file-backed pages (shared libraries and the memory-mapped Arrow file, which "
    "datasets reads through once), reclaimable page cache that grows with the dataset's size on "
    "disk, not with openkd's state. The baseline of the 1M figures is the 100k run. The 100k "
    "run is measured 3 times (it takes a few seconds, mostly start-up, so its wall time is "
    "noisy) and the 1M run once, on the same converted cache; each figure takes the median "
    "run of its size. Last row: the conversion process alone (datasets' work, "
    "informational)."
)
# openkd's own loader, so the measured run's load_dataset call hits exactly this cache entry.
CONVERT = (
    "import sys; from openkd.data.sources import load_source; "
    "print(len(load_source(sys.argv[1])), 'rows in Arrow')"
)


def output_path(ctx: Context, n: int):
    return ctx.path("generate_mock", f"mock-{n}", "teacher.jsonl")


def mock_command(ctx: Context, n: int, *, overwrite: bool):
    args = [
        "generate",
        "--backend",
        "mock",
        "--teacher",
        "mock-reverse",
        "--mock-rule",
        "reverse",
        "--dataset",
        ctx.prompts(n),
        "--output",
        output_path(ctx, n),
    ]
    return proc.openkd_command(*args, *(["--overwrite"] if overwrite else []))


def labelled_rows(ctx: Context, n: int) -> int:
    out = output_path(ctx, n)
    meta = json.loads(out.with_name("teacher.meta.json").read_text())
    return int(meta["counts"]["train"]["rows"])


def cache_files(ctx: Context) -> set[Path]:
    return {p for p in Path(ctx.env["HF_DATASETS_CACHE"]).rglob("*") if p.is_file()}


def convert(ctx: Context, n: int) -> proc.Measured:
    """An empty datasets cache, then the prompts converted to Arrow the way openkd loads them."""
    shutil.rmtree(ctx.env["HF_DATASETS_CACHE"], ignore_errors=True)
    return ctx.run(
        f"datasets: JSON -> Arrow, {n:,} prompts (not part of the measured run)",
        [sys.executable, "-c", CONVERT, str(ctx.prompts(n))],
        log=f"{NAME}-convert-{n}",
    )


def measure(ctx: Context, n: int, label: str = "") -> proc.Measured:
    before = cache_files(ctx)
    m = ctx.run(
        f"openkd generate --backend mock, {n:,} prompts{label}",
        mock_command(ctx, n, overwrite=True),
        log=f"{NAME}-{n}",
    )
    added = cache_files(ctx) - before
    if any(p.suffix == ".arrow" for p in added):
        raise proc.BenchError(
            f"the measured run on {n:,} prompts converted the dataset again (new in the cache: "
            f"{', '.join(sorted(p.name for p in added))}); the conversion step no longer "
            "matches openkd's load_dataset call"
        )
    rows = labelled_rows(ctx, n)
    if rows != n:
        raise proc.BenchError(f"the mock run on {n:,} prompts wrote {rows:,} rows")
    return m


@dataclass(frozen=True)
class Size:
    """The median of the measured runs at one size, each figure on its own."""

    wall: float
    cpu: float
    anon: float
    file: float
    rss: float
    runs: list[proc.Measured]

    @classmethod
    def of(cls, runs: list[proc.Measured]) -> Size:
        def median(field: str) -> float:
            return statistics.median(getattr(m, field) for m in runs)

        return cls(
            median("wall_seconds"),
            median("cpu_seconds"),
            median("max_anon_mib"),
            median("max_file_mib"),
            median("max_rss_mib"),
            runs,
        )

    def each(self, field: str, digits: int = 0) -> str:
        return "/".join(f"{getattr(m, field):.{digits}f}" for m in self.runs)


def run(ctx: Context) -> list[Result]:
    sizes: dict[int, Size] = {}
    conversions: dict[int, proc.Measured] = {}
    for n in SIZES:
        ctx.prompts(n)  # built before timing
        conversions[n] = convert(ctx, n)
        count = REPEATS[n]
        sizes[n] = Size.of(
            [
                measure(ctx, n, f" (run {i + 1} of {count})" if count > 1 else "")
                for i in range(count)
            ]
        )
    small, large = SIZES
    s, b = sizes[small], sizes[large]
    cpu_ratio = (large / b.cpu) / (small / s.cpu)
    return [
        Result(
            NAME,
            "rows/s, 1M prompts, whole process",
            "rows/s",
            large / b.wall,
            small / s.wall,
            "openkd at 100k",
            Target("ratio_at_least", 0.9),
            note=(
                f"wall {b.each('wall_seconds', 1)} s vs {s.each('wall_seconds', 1)} s; "
                f"per CPU second {cpu_ratio:.2f}"
            ),
        ),
        Result(
            NAME,
            "peak anonymous memory (RssAnon), 1M vs 100k prompts",
            "MiB",
            b.anon,
            s.anon,
            "openkd at 100k",
            Target("ratio_at_most", 1.1),
            note=(
                f"runs {b.each('max_anon_mib')} vs {s.each('max_anon_mib')} MiB; growth "
                f"{b.anon - s.anon:.0f} MiB for 900k more prompts"
            ),
        ),
        Result(
            NAME,
            "peak RSS, 1M vs 100k prompts",
            "MiB",
            b.rss,
            s.rss,
            "openkd at 100k",
            Target("at_most", 1024),
            note=(
                f"of which file-backed (peak RssFile) {b.file:.0f} vs {s.file:.0f} MiB: shared "
                "libraries plus the memory-mapped Arrow file, reclaimable page cache that grows "
                "with the dataset on disk"
            ),
        ),
        Result(
            NAME,
            "datasets' JSON -> Arrow conversion alone (separate process), peak RssAnon",
            "MiB",
            conversions[large].max_anon_mib,
            conversions[small].max_anon_mib,
            "the same at 100k",
            INFO,
            note=(
                f"{conversions[large].wall_seconds:.1f} s vs "
                f"{conversions[small].wall_seconds:.1f} s; inside a cold-cache run it would "
                "set the run's peak"
            ),
        ),
    ]
