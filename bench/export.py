"""`openkd export`: rows/s and bytes per answer token of each format against the sidecar, and
DistillKit's compression error.

The input is the soft-label benchmark's data (train_soft): the mock teacher's answers to 4,000
prompts with their top-20 float16 log-probabilities in the sidecar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bench.context import Context
from bench.results import INFO, Result
from bench.train import ROWS

NAME = "export"
K = 20
FORMATS = ("parquet", "axolotl-kd", "distillkit")
# DistillKit's "budget pick" (its README: k 50, exact_k 1, bfloat16, terms 0, 1, sqrt) at k 20.
BUDGET = (
    f"d: 2000\nk: {K}\nexact_k: 1\nexact_dtype: bfloat16\npolynomial_terms: [0, 1, sqrt]\n"
    "term_dtype: float32\nresidual_bins: []\ndelta_encoding: false\n"
)
METHOD = (
    f"The train_soft labels ({ROWS:,} mock-teacher rows, top-{K} float16 in the sidecar, tiny "
    "model tokenizer) exported with `openkd export --format F` in a fresh process each. rows/s "
    "= rows / the streaming pass (first row read to last file closed; from the export's "
    "manifest: tokenizer loading and imports excluded); its baseline is the same pass reading "
    "the rows and their top-k from the sidecar and writing nothing (openkd.export.source). "
    "Bytes per token = every file of the export / the answer tokens exported, against the "
    "sidecar's files / the same tokens. The mock's top-k is synthetic and repeats (0.6 on the "
    "answer token, then fixed steps), so zstd compresses these Parquet files far better than "
    "real teachers' values would: read the bytes/token as the format's floor. DistillKit's "
    "compression error: the set exported with DistillKit's budget settings at k 20 (exact_k 1 "
    "bfloat16, polynomial 0, 1, sqrt) read back through openkd's DistillKit decoder, absolute "
    "error per top-k log-probability against the sidecar's; openkd's default settings (exact "
    "float16 up to top-32) are lossless."
)
READ_ONLY = """
import json, sys, time
from openkd.export.source import Source
source = Source(sys.argv[1])
t0 = time.monotonic(); rows = 0
for row in source.rows():
    rows += 1
json.dump({"rows": rows, "seconds": time.monotonic() - t0}, open(sys.argv[2], "w"))
"""


def _export(ctx: Context, labels: Path, fmt: str, out: Path, *extra: str) -> dict:
    from bench import proc

    ctx.run(
        f"openkd export --format {fmt}, {ROWS:,} rows",
        proc.openkd_command(
            "export", "--input", labels, "--format", fmt, "--output", out, "--overwrite", *extra
        ),
        log=f"{NAME}-{fmt}",
    )
    return json.loads((out / ".openkd-export.json").read_text())  # type: ignore[no-any-return]


def _read_only(ctx: Context, labels: Path) -> float:
    result = ctx.path("runs", NAME, "read-only.json")
    result.parent.mkdir(parents=True, exist_ok=True)
    ctx.run(
        "reading the sidecar rows alone (baseline)",
        [sys.executable, "-c", READ_ONLY, str(labels), str(result)],
        log=f"{NAME}-read-only",
    )
    data = json.loads(result.read_text())
    return float(data["rows"] / data["seconds"])


def _compression_error(labels: Path, exported: Path) -> tuple[float, float]:
    from openkd.data.logprobs import SidecarReader, sidecar_dir
    from openkd.export.imports import convert

    original = SidecarReader(sidecar_dir(labels))
    back = SidecarReader(convert(exported, "distillkit", None)[0])
    total, count, worst = 0.0, 0, 0.0
    for row_id, row in original:
        got = back[row_id]
        if not np.array_equal(got.top_ids, row.top_ids):
            raise ValueError(f"row {row_id}: the top-k ids came back different")
        error = np.abs(got.top_logprobs - row.top_logprobs)
        total, count = total + float(error.sum()), count + error.size
        worst = max(worst, float(error.max()))
    return total / count, worst


def run(ctx: Context) -> list[Result]:
    from openkd.data.logprobs import SidecarReader, sidecar_dir

    labels = ctx.teacher_labels(ROWS, logprobs=K)
    reader = SidecarReader(sidecar_dir(labels))
    tokens = sum(len(row.token_ids) for _, row in reader)
    sidecar_per_token = reader.nbytes / tokens
    baseline = _read_only(ctx, labels)
    results = []
    for fmt in FORMATS:
        manifest = _export(ctx, labels, fmt, ctx.path("runs", NAME, fmt))
        results.append(
            Result(
                NAME,
                f"export rows/s, --format {fmt} (top-{K}), streaming pass, CPU",
                "rows/s",
                manifest["rows_per_second"],
                baseline,
                "reading the sidecar rows alone",
                INFO,
                note=f"{manifest['rows']:,} rows, {manifest['stream_seconds']:.2f} s; "
                f"whole process {manifest['seconds']:.1f} s",
            )
        )
        results.append(
            Result(
                NAME,
                f"bytes per answer token, --format {fmt} (top-{K}, zstd Parquet)",
                "B/tok",
                manifest["bytes"] / manifest["tokens"],
                sidecar_per_token,
                "the sidecar (float16 Arrow)",
                INFO,
                note=f"{manifest['tokens']:,} answer tokens; synthetic, repetitive top-k",
            )
        )
    config = ctx.path("runs", NAME, "budget.yaml")
    config.write_text(BUDGET, encoding="utf-8")
    budget = ctx.path("runs", NAME, "distillkit-budget")
    manifest = _export(ctx, labels, "distillkit", budget, "--distillkit-config", str(config))
    mean, worst = _compression_error(labels, budget)
    results.append(
        Result(
            NAME,
            f"DistillKit compression error, budget settings at k {K} (mean abs log-prob error)",
            "nats",
            mean,
            None,
            "-",
            INFO,
            note=f"max {worst:.4f}; {manifest['bytes'] / manifest['tokens']:.1f} B/tok; the "
            "default (exact float16) is lossless",
        )
    )
    return results
