"""Stage 2 overhead: `openkd train` tokens/s vs a plain TRL `SFTTrainer` script.

Same student (the tiny float32 Llama), same labels (mock teacher answers), same settings
(steps, batch, max length, learning rate, seed, a checkpoint at the end). Both run under
bench.probe, which counts the tokens in every batch the model sees and times the training
loop, so the two tokens/s are measured the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import proc
from bench.context import Context
from bench.results import Result, Target

NAME = "train"
ROWS = 4_000
STEPS = 300
REPEATS = 3
BATCH = 8
MAX_LENGTH = 256
LEARNING_RATE = "1e-3"
METHOD = (
    f"tiny float32 Llama student, {ROWS:,} mock-teacher rows (reverse-the-words), {STEPS} steps "
    f"of batch {BATCH}, --max-length {MAX_LENGTH}, lr {LEARNING_RATE}, seed 42, CPU. openkd: "
    "`openkd train` (its defaults otherwise: completion-only loss, pre-flight checks, token "
    "accounting, a checkpoint at the last step). Baseline: bench/baselines/plain_trl.py, the "
    "same SFTConfig written by hand. Both run under bench/probe.py: tokens = non-padding tokens "
    "of every batch given to the model, time = first training step until Trainer.train returns "
    "(model loading and data preparation excluded from both, the final checkpoint included). "
    f"The two alternate, {REPEATS} runs each; the runs of one program see identical batches, so "
    "each step counts with its lowest CPU time over the runs (this process's CPU time: the 2-core "
    "machine is shared, and wall time there measured the other load more than the programs; "
    "with one OpenMP thread a step's CPU time is its wall time on an idle machine). The note "
    "gives the same ratio in wall time (fastest steps, and best whole runs) and the ratio of "
    "the runs' whole-loop CPU time."
)


def probe_command(stats: Path, module: str, *args: str | Path) -> list[str]:
    return proc.python_module("bench.probe", "train", stats, "-m", module, *map(str, args))


def openkd_train(
    ctx: Context,
    name: str,
    labels: Path,
    *,
    steps: int,
    flags: tuple[str, ...] = (),
    variant: str = "openkd",
) -> dict:
    """One `openkd train` run (with extra `flags`) under the probe; its stats."""
    out = ctx.path(name, variant)
    shutil.rmtree(out, ignore_errors=True)
    stats = out.with_name(out.name + ".stats.json")
    ctx.run(
        " ".join(("openkd train", *flags)),
        probe_command(
            stats,
            "openkd",
            "train",
            "--student",
            ctx.tiny_model(),
            "--dataset",
            labels,
            "--output-dir",
            out,
            "--max-steps",
            str(steps),
            "--batch-size",
            str(BATCH),
            "--max-length",
            str(MAX_LENGTH),
            "--learning-rate",
            LEARNING_RATE,
            "--save-steps",
            "1000",
            "--logging-steps",
            "10",
            "--resume",
            "no",
            *flags,
        ),
        log=f"{name}-{variant}",
    )
    return json.loads(stats.read_text())


def tokens_per_second(stats: dict) -> float:
    if not stats.get("seconds"):
        raise proc.BenchError(f"no training steps were measured: {stats}")
    return stats["real_tokens"] / stats["seconds"]


def plain_trl(ctx: Context, labels: Path, *, steps: int) -> dict:
    out = ctx.path(NAME, "plain-trl")
    shutil.rmtree(out, ignore_errors=True)
    stats = out.with_name("plain-trl.stats.json")
    ctx.run(
        "baseline: plain TRL SFTTrainer script",
        probe_command(
            stats,
            "bench.baselines.plain_trl",
            "--model",
            ctx.tiny_model(),
            "--data",
            labels,
            "--output-dir",
            out,
            "--max-steps",
            str(steps),
            "--batch-size",
            str(BATCH),
            "--max-length",
            str(MAX_LENGTH),
            "--learning-rate",
            LEARNING_RATE,
            "--save-steps",
            "1000",
        ),
        log=f"{NAME}-plain-trl",
    )
    return json.loads(stats.read_text())


def summary(runs: list[dict]) -> list[dict]:
    """The runs without their per-step times (kept out of RESULTS.md)."""
    return [
        {k: v for k, v in r.items() if k not in ("step_seconds", "step_cpu_seconds")} for r in runs
    ]


def best(runs: list[dict]) -> dict:
    return max(runs, key=tokens_per_second)


def fastest_steps_seconds(runs: list[dict], key: str = "step_seconds") -> float:
    """The loop time with every step at its fastest over `runs` (which saw identical batches);
    `key`: the per-step times to use (wall, or `step_cpu_seconds`)."""
    if len({r["real_tokens"] for r in runs}) != 1 or len({len(r[key]) for r in runs}) != 1:
        raise proc.BenchError("repeated runs of one program saw different batches")
    return sum(min(times) for times in zip(*(r[key] for r in runs), strict=True))


def run(ctx: Context) -> list[Result]:
    labels = ctx.teacher_labels(ROWS)
    ours, theirs = [], []
    for _ in range(REPEATS):
        ours.append(openkd_train(ctx, NAME, labels, steps=STEPS))
        theirs.append(plain_trl(ctx, labels, steps=STEPS))
    a, b = best(ours), best(theirs)
    if a["real_tokens"] != b["real_tokens"]:
        raise proc.BenchError(
            f"openkd and TRL trained on different batches ({a['real_tokens']:,} vs "
            f"{b['real_tokens']:,} tokens); the comparison would be meaningless"
        )
    run_ratio = tokens_per_second(a) / tokens_per_second(b)
    wall_ratio = fastest_steps_seconds(theirs) / fastest_steps_seconds(ours)
    cpu_ratio = min(r["cpu_seconds"] for r in theirs) / min(r["cpu_seconds"] for r in ours)
    note = (
        f"wall time: fastest steps {wall_ratio:.3f}, best whole runs {run_ratio:.3f}; "
        f"whole-loop CPU time {cpu_ratio:.3f}"
    )
    return [
        Result(
            NAME,
            "training tokens per CPU second (non-padding), CPU",
            "tok/s",
            a["real_tokens"] / fastest_steps_seconds(ours, "step_cpu_seconds"),
            b["real_tokens"] / fastest_steps_seconds(theirs, "step_cpu_seconds"),
            "plain TRL SFTTrainer",
            Target("ratio_at_least", 0.98),
            note=note,
            details={"openkd_runs": summary(ours), "baseline_runs": summary(theirs)},
        )
    ]
