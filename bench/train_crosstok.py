"""Cross-tokenizer soft labels: `openkd train --loss mix` tokens/s when the student's tokenizer
differs from the teacher's, against the same loss on one tokenizer, and the alignment's cost.

Labels: the soft-label benchmark's mock-teacher rows and top-20 over the tiny model's tokenizer
(make-tiny seed 0). Same-tokenizer student: that tiny model. Cross-tokenizer student: make-tiny
seed 1 (another BPE vocabulary; same architecture and size), whose run aligns the teacher's
top-20 to its own tokens once, in dataset preparation (`openkd.distill.crosstok`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench.context import Context
from bench.results import INFO, Result, Target
from bench.train import BATCH, LEARNING_RATE, MAX_LENGTH, ROWS, fastest_steps_seconds, summary

NAME = "train_crosstok"
K = 20
STEPS = 150
REPEATS = 2
METHOD = (
    f"tiny float32 Llama students (vocabulary 2,000), the soft-label benchmark's {ROWS:,} "
    f"mock-teacher rows with top-{K} float16 log-probabilities over make-tiny seed 0's "
    f"tokenizer, {STEPS} steps of batch {BATCH}, --max-length {MAX_LENGTH}, lr {LEARNING_RATE}, "
    "seed 42, CPU, `--loss mix` (alpha 0.5, T 1). Cross: student make-tiny seed 1 (another BPE "
    "vocabulary), `--cross-tokenizer auto` (gold). Same: student make-tiny seed 0. Alternating, "
    f"{REPEATS} runs each under bench/probe.py (tokens = the student's non-padding tokens, time "
    "= each step at its lowest CPU time over the runs: the machine is shared). Alignment: "
    "`Aligner.align` over every row in this process, CPU time (time.process_time)."
)


def _train(ctx: Context, labels: Path, student: Path, variant: str) -> dict:
    from bench.train import probe_command

    out = ctx.path(NAME, variant)
    shutil.rmtree(out, ignore_errors=True)
    stats = out.with_name(out.name + ".stats.json")
    args = (
        "train", "--student", student, "--dataset", labels, "--output-dir", out,
        "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH),
        "--learning-rate", LEARNING_RATE, "--save-steps", "1000", "--logging-steps", "10",
        "--resume", "no", "--loss", "mix",
    )  # fmt: skip
    ctx.run(
        f"openkd train --loss mix ({variant})",
        probe_command(stats, "openkd", *args),
        log=f"{NAME}-{variant}",
    )
    return json.loads(stats.read_text())


def align_rows(labels: Path, teacher: Path, student: Path) -> tuple[float, int, dict]:
    """CPU seconds to align every row of `labels` to `student`'s tokens, rows, coverage."""
    from transformers import AutoTokenizer

    from openkd.data.jsonl import iter_jsonl
    from openkd.data.logprobs import SidecarReader, sidecar_dir
    from openkd.distill.crosstok.aligner import Aligner
    from openkd.distill.crosstok.preflight import measure
    from openkd.train.soft import completion_text

    student_tok = AutoTokenizer.from_pretrained(student)
    aligner = Aligner(
        AutoTokenizer.from_pretrained(teacher), student_tok, "gold", student_tok.eos_token_id
    )
    reader = SidecarReader(sidecar_dir(labels))
    rows = [row for _, row in iter_jsonl(labels)]
    aligner.align(*(lambda r: (r.token_ids, r.top_ids, r.top_logprobs))(reader[rows[0]["id"]]))
    start = time.process_time()
    coverage = measure(aligner, ((reader[r["id"]], completion_text(r)) for r in rows), "gold")
    return time.process_time() - start, len(rows), coverage.record()


def run(ctx: Context) -> list[Result]:
    from openkd.tiny import TinySpec

    labels = ctx.teacher_labels(ROWS, logprobs=K)
    same_student = ctx.tiny_model()
    cross_student = ctx._built_model(
        "tiny-model-seed1", "the seed-1 tiny model (another vocabulary)", TinySpec(seed=1)
    )
    cross, same = [], []
    for _ in range(REPEATS):
        cross.append(_train(ctx, labels, cross_student, "cross"))
        same.append(_train(ctx, labels, same_student, "same"))
    key = "step_cpu_seconds"
    cross_loop, same_loop = fastest_steps_seconds(cross, key), fastest_steps_seconds(same, key)
    seconds, rows, coverage = align_rows(labels, same_student, cross_student)
    per_step = seconds / rows * BATCH  # aligning one batch's rows
    return [
        Result(
            NAME,
            "training tokens/s, --loss mix across tokenizers vs one tokenizer, CPU",
            "tok/s",
            cross[0]["real_tokens"] / cross_loop,
            same[0]["real_tokens"] / same_loop,
            "--loss mix, one tokenizer, same run",
            Target("ratio_at_least", 0.7),
            note=f"coverage {coverage['coverage']:.1%} (exact {coverage['exact']:.1%}, merged "
            f"{coverage['merged']:.1%}, ULD {coverage['uld']:.1%})",
            details={"cross_runs": summary(cross), "same_runs": summary(same)},
        ),
        Result(
            NAME,
            "alignment preprocessing, rows/s (once per run: epochs reuse it, a resume redoes it)",
            "rows/s",
            rows / seconds,
            None,
            "",
            INFO,
            note=f"a batch's alignment would be {per_step / (cross_loop / STEPS):.1%} of a "
            f"training step's CPU time if done per step; done once it is {seconds:.2f} s for "
            f"{rows:,} rows",
        ),
    ]
