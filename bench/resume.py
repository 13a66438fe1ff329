"""Resume cost: rerunning a finished 1M-prompt `openkd generate` must take seconds, not minutes.

A rerun reads back what earlier runs wrote (the id index beside the output), plans the prompts
again and finds nothing to do; no teacher is started. The target is absolute (a user reruns a
finished job and expects an answer at once); the full run's time is shown as context.
"""

from __future__ import annotations

import json

from bench import generate_mock, proc
from bench.context import Context
from bench.results import Result, Target

NAME = "resume"
N = 1_000_000
TARGET_SECONDS = 5
METHOD = (
    "the exact command of the 1M-prompt mock run of generate_mock rerun on its finished output "
    "(no --overwrite; the datasets cache is warm, as for any rerun): wall time of the whole "
    f"process, which must find all 1M rows done and label none; target under {TARGET_SECONDS} s. "
    "Baseline, for context only: the full 1M run's wall time as openkd recorded it in "
    "<output>.meta.json (from generate_mock in the same bench run, or measured here, after "
    "generate_mock's conversion step, if it is missing)."
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
        generate_mock.convert(ctx, N)
        full = generate_mock.measure(ctx, N).wall_seconds
    before = generate_mock.cache_files(ctx)
    m = ctx.run(
        f"openkd generate rerun on the finished {N:,}-row output",
        generate_mock.mock_command(ctx, N, overwrite=False),
        log=f"{NAME}-rerun",
    )
    meta = json.loads(generate_mock.output_path(ctx, N).with_name("teacher.meta.json").read_text())
    last = meta["runs"][-1]
    if last.get("labelled") != 0 or last.get("already_done") != N:
        raise proc.BenchError(f"the rerun did not skip every row: {last}")
    note = f"peak RSS {m.max_rss_mib:.0f} MiB, RssAnon {m.max_anon_mib:.0f} MiB"
    if any(p.suffix == ".arrow" for p in generate_mock.cache_files(ctx) - before):
        note += "; the datasets cache was cold, so this rerun converted the dataset too"
    return [
        Result(
            NAME,
            "rerun of a finished 1M-prompt run, wall time",
            "s",
            m.wall_seconds,
            full,
            "the full run",
            Target("at_most", TARGET_SECONDS),
            note=note,
        )
    ]
