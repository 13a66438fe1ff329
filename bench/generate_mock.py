"""Pipeline overhead: `openkd generate --backend mock` (zero latency) on 100k and 1M prompts.

With a teacher that answers instantly, all that is left is openkd: reading the dataset, ids,
resume bookkeeping, writing and fsyncing rows. Rows/s must not fall and peak RSS must not
grow with the number of prompts (prompts are streamed from the Arrow table, never all held).
"""

from __future__ import annotations

import json
import shutil

from bench import proc
from bench.context import Context
from bench.results import Result, Target

NAME = "generate_mock"
SIZES = (100_000, 1_000_000)
METHOD = (
    "`openkd generate --backend mock --mock-latency 0` (default --batch-size 256, every batch "
    "fsynced) on 100k and 1M distinct prompts, each run a fresh process started from an empty "
    "datasets cache (so the JSONL -> Arrow conversion is included). rows/s = rows / wall time of "
    "the whole process (start-up, dataset load, planning, labelling, writing), and the same "
    "ratio per CPU second in the note (steadier on a busy machine); peak RSS = "
    "`getrusage(RUSAGE_CHILDREN).ru_maxrss` of a fresh wrapper process. The baseline of the 1M "
    "figures is the 100k run: rows/s should stay flat and RSS must not grow with the prompts."
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


def run(ctx: Context) -> list[Result]:
    measured = {}
    for n in SIZES:
        ctx.prompts(n)  # built before timing
        shutil.rmtree(ctx.env["HF_DATASETS_CACHE"], ignore_errors=True)
        m = ctx.run(
            f"openkd generate --backend mock, {n:,} prompts",
            mock_command(ctx, n, overwrite=True),
            log=f"{NAME}-{n}",
        )
        rows = labelled_rows(ctx, n)
        if rows != n:
            raise proc.BenchError(f"the mock run on {n:,} prompts wrote {rows:,} rows")
        measured[n] = (rows / m.wall_seconds, m.max_rss_mib, m.wall_seconds, m.cpu_seconds)
    small, large = SIZES
    rate_small, rss_small, wall_small, cpu_small = measured[small]
    rate_large, rss_large, wall_large, cpu_large = measured[large]
    cpu_ratio = (large / cpu_large) / (small / cpu_small)
    return [
        Result(
            NAME,
            "rows/s, 1M prompts, whole process",
            "rows/s",
            rate_large,
            rate_small,
            "openkd at 100k",
            Target("ratio_at_least", 0.9),
            note=f"wall {wall_large:.0f} s vs {wall_small:.0f} s; per CPU second {cpu_ratio:.2f}",
        ),
        Result(
            NAME,
            "peak RSS, 1M prompts",
            "MiB",
            rss_large,
            None,
            "",
            Target("at_most", 1024),
        ),
        Result(
            NAME,
            "peak RSS growth, 1M vs 100k prompts",
            "MiB",
            rss_large,
            rss_small,
            "openkd at 100k",
            Target("ratio_at_most", 1.25),
        ),
    ]
