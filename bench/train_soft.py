"""Soft labels: `openkd train --loss mix` tokens/s against `--loss hard` in the same run, and the
sidecar's size per completion token.

Same student, labels, steps, batch and seed for both losses; the mix run also reads the
teacher's top-20 log-probabilities from the `<stem>.logprobs/` sidecar (written once per work
directory by `openkd generate --backend mock --logprobs 20`, the mock's synthetic top-20 over
the tiny model's tokenizer) and computes the chunked KL over top-20 + rest buckets.
"""

from __future__ import annotations

from pathlib import Path

from bench import proc
from bench.context import Context
from bench.results import INFO, Result, Target
from bench.train import BATCH, LEARNING_RATE, MAX_LENGTH, ROWS, openkd_train, tokens_per_second

NAME = "train_soft"
K = 20
STEPS = 150
REPEATS = 2
METHOD = (
    f"tiny float32 Llama student (vocabulary 2,000), the train benchmark's {ROWS:,} mock-teacher "
    f"rows, {STEPS} steps of batch {BATCH}, --max-length {MAX_LENGTH}, lr {LEARNING_RATE}, seed "
    f"42, CPU. `openkd train --loss mix` (alpha 0.5, T 1, top-{K} float16 log-probabilities "
    "written once by `openkd generate --backend mock --logprobs 20`) against `openkd "
    "train --loss hard`, alternating, "
    f"{REPEATS} runs each, both under bench/probe.py (tokens = non-padding tokens given to the "
    "model, time = first step to the end of Trainer.train); each step counts at its fastest "
    "over the runs. Bytes per token = the sidecar's files / the completion tokens it holds; "
    f"the baseline is the column data alone, 4 + {K} × (4 + 2) bytes."
)


def train(ctx: Context, labels: Path, loss: str) -> dict:
    return openkd_train(
        ctx, NAME, labels, steps=STEPS, flags=("--loss", loss), variant=f"openkd-{loss}"
    )


def bytes_per_completion_token(directory: Path) -> tuple[float, int]:
    from openkd.data.logprobs import SidecarReader

    reader = SidecarReader(directory)
    tokens = sum(len(row.token_ids) for _, row in reader)
    return reader.nbytes / tokens, tokens


def run(ctx: Context) -> list[Result]:
    from bench.train import fastest_steps_seconds, summary
    from openkd.data.logprobs import bytes_per_token, sidecar_dir

    labels = ctx.teacher_labels(ROWS, logprobs=K)
    directory = sidecar_dir(labels)
    mix, hard = [], []
    for _ in range(REPEATS):
        mix.append(train(ctx, labels, "mix"))
        hard.append(train(ctx, labels, "hard"))
    if mix[0]["real_tokens"] != hard[0]["real_tokens"]:
        raise proc.BenchError(
            f"--loss mix and --loss hard trained on different batches ({mix[0]['real_tokens']:,}"
            f" vs {hard[0]['real_tokens']:,} tokens); the comparison would be meaningless"
        )
    best_mix = max(tokens_per_second(r) for r in mix)
    best_hard = max(tokens_per_second(r) for r in hard)
    per_token, tokens = bytes_per_completion_token(directory)
    return [
        Result(
            NAME,
            f"training tokens/s, --loss mix (top-{K}) vs --loss hard, CPU",
            "tok/s",
            mix[0]["real_tokens"] / fastest_steps_seconds(mix),
            hard[0]["real_tokens"] / fastest_steps_seconds(hard),
            "--loss hard, same run",
            Target("ratio_at_least", 0.7),
            note=f"best whole runs {best_mix / best_hard:.3f}",
            details={"mix_runs": summary(mix), "hard_runs": summary(hard)},
        ),
        Result(
            NAME,
            f"sidecar bytes per completion token (top-{K}, float16)",
            "B/tok",
            per_token,
            float(bytes_per_token(K)),
            "column data alone",
            INFO,
            note=f"{tokens:,} tokens in {ROWS:,} rows (short answers: per-row id and offsets "
            "weigh more than on long ones)",
        ),
    ]
