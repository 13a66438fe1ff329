"""Packing efficiency: the share of the tokens the student computes on that are real (not
padding), with and without `--packing` (TRL's bfd strategy, padding-free).
"""

from __future__ import annotations

from bench.context import Context
from bench.results import INFO, Result
from bench.train import BATCH, MAX_LENGTH, ROWS, openkd_train, tokens_per_second

NAME = "packing"
STEPS = 40
METHOD = (
    f"`openkd train` on the train benchmark's data and student, {STEPS} steps of batch {BATCH}, "
    f"--max-length {MAX_LENGTH}, once with --packing and once without, under bench/probe.py. "
    "Share = non-padding tokens / all tokens of the input_ids tensors given to the model "
    "(padding-free packed batches have no padding). Tokens per step shows how much more text "
    "each optimizer step sees when packed; tokens/s is informative (on CPU the packed batches "
    "use a block-diagonal attention mask built from position_ids, not flash-attention)."
)


def run(ctx: Context) -> list[Result]:
    labels = ctx.teacher_labels(ROWS)
    packed = openkd_train(
        ctx, NAME, labels, steps=STEPS, flags=("--packing",), variant="openkd-packed"
    )
    padded = openkd_train(ctx, NAME, labels, steps=STEPS)

    def share(stats: dict) -> float:
        return stats["real_tokens"] / stats["tensor_tokens"]

    def per_step(stats: dict) -> float:
        return stats["real_tokens"] / stats["steps"]

    return [
        Result(
            NAME,
            "non-padding share of computed tokens",
            "",
            share(packed),
            share(padded),
            "without --packing",
            INFO,
        ),
        Result(
            NAME,
            "real tokens per optimizer step",
            "tok",
            per_step(packed),
            per_step(padded),
            "without --packing",
            INFO,
        ),
        Result(
            NAME,
            "training tokens/s",
            "tok/s",
            tokens_per_second(packed),
            tokens_per_second(padded),
            "without --packing",
            INFO,
        ),
    ]
