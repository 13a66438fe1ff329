"""On-policy distillation: `openkd train --loss on-policy` tokens/s vs a plain TRL
`DistillationTrainer` script, and where openkd's step time goes (sampling / teacher / rest).

Same student (the tiny float32 Llama), teacher (the same architecture and tokenizer, another
initialisation), prompts, steps, batch, beta and seed on both sides; both run under
bench.probe's `onpolicy` probe, which counts the prompt and sampled tokens of every batch TRL
builds and times the training loop, so the two tokens/s are measured the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import proc
from bench.context import Context
from bench.results import Result, Target
from bench.train import LEARNING_RATE, ROWS, tokens_per_second

NAME = "train_onpolicy"
STEPS = 40
BATCH = 8
COMPLETION = 32
MAX_LENGTH = 256
REPEATS = 3
METHOD = (
    f"tiny float32 Llama student and teacher (same tokenizer, weights seeds 0 and 1; both "
    f"random, so nearly every sample runs to the {COMPLETION}-token limit), the train "
    f"benchmark's {ROWS:,} prompts, {STEPS} steps of batch {BATCH}, --max-completion-length "
    f"{COMPLETION}, --max-length {MAX_LENGTH}, lr {LEARNING_RATE}, beta 1 (reverse KL), T 1, "
    "sampling temperature 1, seed 42, logging every 10 steps, CPU. openkd: `openkd train --loss "
    "on-policy --teacher` (its defaults otherwise: pre-flight checks, the prompt-length filter, "
    "the exact reverse-KL metric on the first, every logging and the last step, the step-time "
    "shares, the non-finite guard). Baseline: bench/baselines/plain_trl_onpolicy.py, the same "
    "DistillationConfig written by hand. Both run under bench/probe.py's onpolicy probe: tokens "
    "= prompt + sampled tokens of every batch (the masks TRL builds; both sides sample the same "
    "tokens, checked), time = first training step until Trainer.train returns (model loading "
    f"and data preparation excluded from both). The two alternate, {REPEATS} runs each; each "
    "step counts with its lowest CPU time over a program's runs (this process's CPU time: the "
    "2-core machine is shared, and wall time there measured the other load more than the "
    "programs). The note gives the same ratio in wall time (fastest steps, and best whole "
    "runs) and the share of openkd's step time spent sampling, in the teacher's forward pass "
    "and in the rest (the student's forward and backward, the loss, the optimizer), from its "
    "run record (openkd_run.json)."
)


def probe(stats: Path, module: str, *args: str | Path) -> list[str]:
    return proc.python_module("bench.probe", "onpolicy", stats, "-m", module, *map(str, args))


def openkd_on_policy(ctx: Context, labels: Path, teacher: Path) -> dict:
    """One `openkd train --loss on-policy` run under the probe; its stats and run results."""
    out = ctx.path(NAME, "openkd")
    shutil.rmtree(out, ignore_errors=True)
    stats = out.with_name("openkd.stats.json")
    args = ("train", "--student", ctx.tiny_model(), "--teacher", teacher, "--loss", "on-policy",
            "--dataset", labels, "--output-dir", out, "--max-steps", str(STEPS),
            "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH),
            "--max-completion-length", str(COMPLETION), "--learning-rate", LEARNING_RATE,
            "--save-steps", "1000", "--logging-steps", "10", "--resume", "no")  # fmt: skip
    ctx.run(
        "openkd train --loss on-policy",
        probe(stats, "openkd", *args),
        log=f"{NAME}-openkd",
    )
    found = json.loads(stats.read_text())
    found["results"] = json.loads((out / "openkd_run.json").read_text())["results"]
    return found


def plain_trl(ctx: Context, labels: Path, teacher: Path) -> dict:
    out = ctx.path(NAME, "plain-trl")
    shutil.rmtree(out, ignore_errors=True)
    stats = out.with_name("plain-trl.stats.json")
    args = ("--model", ctx.tiny_model(), "--teacher", teacher, "--data", labels,
            "--output-dir", out, "--max-steps", str(STEPS), "--batch-size", str(BATCH),
            "--max-completion-length", str(COMPLETION), "--learning-rate", LEARNING_RATE,
            "--save-steps", "1000", "--logging-steps", "10")  # fmt: skip
    ctx.run(
        "baseline: plain TRL DistillationTrainer script",
        probe(stats, "bench.baselines.plain_trl_onpolicy", *args),
        log=f"{NAME}-plain-trl",
    )
    return json.loads(stats.read_text())


def fastest_steps(runs: list[dict], key: str, whole: str) -> float:
    """The loop with each step at its fastest (`key`: per-step times) over `runs`, which
    sampled identical batches; else the fastest whole run (`whole`)."""
    same = len({r["real_tokens"] for r in runs}) == 1 and len({len(r[key]) for r in runs}) == 1
    if not same:
        return min(r[whole] for r in runs)
    return sum(min(times) for times in zip(*(r[key] for r in runs), strict=True))


def breakdown(results: dict) -> str:
    generate, score = results.get("generate_share"), results.get("score_share")
    if generate is None or score is None:
        return "no step-time shares in openkd_run.json"
    rest = 1 - generate - score
    return f"openkd step time: sampling {generate:.0%}, teacher {score:.0%}, rest {rest:.0%}"


def run(ctx: Context) -> list[Result]:
    from bench.train import summary

    labels = ctx.teacher_labels(ROWS)
    teacher = ctx.tiny_teacher()
    ours, theirs = [], []
    for _ in range(REPEATS):
        ours.append(openkd_on_policy(ctx, labels, teacher))
        theirs.append(plain_trl(ctx, labels, teacher))
    tokens = ours[0]["real_tokens"]
    if any(r["real_tokens"] != tokens for r in ours + theirs):
        raise proc.BenchError(
            "openkd and TRL sampled different numbers of tokens "
            f"({[r['real_tokens'] for r in ours]} vs {[r['real_tokens'] for r in theirs]}); "
            "the comparison would be meaningless"
        )
    ours_cpu = fastest_steps(ours, "step_cpu_seconds", "cpu_seconds")
    theirs_cpu = fastest_steps(theirs, "step_cpu_seconds", "cpu_seconds")
    wall_ratio = fastest_steps(theirs, "step_seconds", "seconds") / fastest_steps(
        ours, "step_seconds", "seconds"
    )
    best_runs = min(r["seconds"] for r in theirs) / min(r["seconds"] for r in ours)
    a = max(ours, key=tokens_per_second)
    return [
        Result(
            NAME,
            "on-policy training tokens per CPU second (prompt + sampled)",
            "tok/s",
            tokens / ours_cpu,
            tokens / theirs_cpu,
            "plain TRL DistillationTrainer",
            Target("ratio_at_least", 0.97),
            note=f"wall time: fastest steps {wall_ratio:.3f}, best whole runs {best_runs:.3f}; "
            f"{tokens:,} tokens on both sides; " + breakdown(a["results"]),
            details={
                "openkd_runs": summary(ours),
                "baseline_runs": summary(theirs),
            },
        ),
    ]
