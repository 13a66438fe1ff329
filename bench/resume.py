"""Resume cost: rerunning a finished 1M-prompt `openkd generate` must take seconds, not minutes.

A rerun reads back every id already written, plans the prompts again and finds nothing to do;
no teacher is started. Compared with the time the full run took.
"""

from __future__ import annotations

import json

from bench import generate_mock, proc
from bench.context import Context
from bench.results import Result, Target

NAME = "resume"
N = 1_000_000
METHOD = (
    "the exact command of the 1M-prompt mock run of generate_mock rerun on its finished output "
    "(no --overwrite; the datasets cache is warm, as for any rerun): wall time of the process, "
    "which must find all 1M rows done and label none. Baseline: the full 1M run's wall time "
    "(from generate_mock in the same bench run, or measured here if it is missing)."
)


def _finished_wall(ctx: Context) -> float | None:
    """Wall time of the full run, if generate_mock left a complete 1M output."""
    out = generate_mock.output_path(ctx, N)
    meta_path = out.with_name("teacher.meta.json")
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("status") != "complete" or meta["counts"]["train"]["rows"] != N:
        return None
    runs = meta.get("runs") or []
    return float(runs[-1]["wall_seconds"]) if runs and runs[-1].get("labelled") == N else None


def run(ctx: Context) -> list[Result]:
    full = _finished_wall(ctx)
    if full is None:
        m = ctx.run(
            f"openkd generate --backend mock, {N:,} prompts (the run to resume)",
            generate_mock.mock_command(ctx, N, overwrite=True),
            log=f"{NAME}-full",
        )
        full = m.wall_seconds
    m = ctx.run(
        f"openkd generate rerun on the finished {N:,}-row output",
        generate_mock.mock_command(ctx, N, overwrite=False),
        log=f"{NAME}-rerun",
    )
    meta = json.loads(generate_mock.output_path(ctx, N).with_name("teacher.meta.json").read_text())
    last = meta["runs"][-1]
    if last.get("labelled") != 0 or last.get("already_done") != N:
        raise proc.BenchError(f"the rerun did not skip every row: {last}")
    return [
        Result(
            NAME,
            "rerun of a finished 1M-prompt run, wall time",
            "s",
            m.wall_seconds,
            full,
            "the full run",
            Target("at_most", 60),
            note=f"peak RSS {m.max_rss_mib:.0f} MiB",
        )
    ]
