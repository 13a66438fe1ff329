"""`openkd export`: stream a generate output into another trainer's format."""

from __future__ import annotations

import time
from typing import Any

from openkd import console
from openkd.data.logprobs import bytes_per_token, sidecar_dir
from openkd.errors import OpenkdError
from openkd.export.axolotl import AxolotlWriter
from openkd.export.codec import CompressionConfig, default_config
from openkd.export.config import ExportConfig
from openkd.export.distillkit import DistillKitWriter, read_config
from openkd.export.parquet import ParquetWriter
from openkd.export.sink import Staging
from openkd.export.source import Source
from openkd.export.tokens import Tokens, load_tokens
from openkd.export.writer import FormatWriter, Options
from openkd.generate.progress import rows_and_tokens

WRITERS: dict[str, type[FormatWriter]] = {
    "axolotl-kd": AxolotlWriter,
    "distillkit": DistillKitWriter,
    "parquet": ParquetWriter,
}


def distillkit_settings(cfg: ExportConfig, source: Source, tokens: Tokens) -> CompressionConfig:
    """The compression config: --distillkit-config, else a default for the sidecar's K."""
    if cfg.distillkit_config is None:
        return default_config(tokens.vocab_size, source.k, source.reader.dtype or "float16")
    settings = read_config(cfg.distillkit_config)
    if settings.k > source.sidecar_k:
        raise OpenkdError(
            f"--distillkit-config {cfg.distillkit_config} has k={settings.k}, but the sidecar "
            f"holds only the top-{source.sidecar_k}; set k: {source.sidecar_k} or less (and "
            f"exact_k <= k), or label with `openkd generate --logprobs {settings.k}`"
        )
    if settings.d < tokens.vocab_size:
        console.warn(
            f"--distillkit-config d={settings.d} is below the tokenizer's {tokens.vocab_size:,} "
            "tokens; a token id at or above d stops the export"
        )
    return settings


def run(cfg: ExportConfig) -> None:
    started = time.monotonic()
    source = Source(cfg.input, cfg.top_k)
    writer_cls = WRITERS[cfg.format]
    tokens = None
    if writer_cls.needs_tokenizer:
        tokens = load_tokens(
            cfg.tokenizer or source.teacher,
            f"--format {cfg.format}",
            trust_remote_code=cfg.trust_remote_code,
        )
    options = Options(rows_per_file=cfg.rows_per_file)
    if cfg.format == "distillkit":
        assert tokens is not None
        options.distillkit_config = distillkit_settings(cfg, source, tokens)
        source.k = options.distillkit_config.k
    provenance = source.provenance(tokens.name if tokens else None)
    total = source.count()
    console.info(
        f"exporting {total:,} rows of {cfg.input} (top-{source.k} of the sidecar's "
        f"top-{source.sidecar_k}) as {cfg.format} to {cfg.output}"
    )
    staging = Staging(cfg.output, [cfg.input, sidecar_dir(cfg.input)], cfg.overwrite)
    try:
        writer = writer_cls(staging.path, provenance, tokens, options)
        streaming = time.monotonic()
        with rows_and_tokens("exporting", total, transient=True, remaining=True) as advance:
            for row in source.rows():
                writer.add(row)
                advance(1, len(row.token_ids))
        writer.finish()
        manifest = _manifest(cfg, writer, time.monotonic() - started)
        manifest["stream_seconds"] = round(time.monotonic() - streaming, 3)
        (staging.path / "README.md").write_text(writer.card(manifest), encoding="utf-8")
        manifest["bytes"] = _bytes(staging.path)
        manifest["bytes_per_token"] = round(manifest["bytes"] / max(1, writer.counts.tokens), 1)
        stream = manifest["stream_seconds"]
        manifest["rows_per_second"] = round(writer.counts.rows / stream, 1) if stream else None
        staging.commit(manifest)
    except BaseException:
        staging.discard()
        raise
    _report(cfg, writer, manifest, source)
    console.stdout_line(str(cfg.output))


def _bytes(directory: Any) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def _manifest(cfg: ExportConfig, writer: FormatWriter, seconds: float) -> dict[str, Any]:
    counts = writer.counts
    return {
        "format": cfg.format,
        "provenance": writer.metadata(),
        "rows": counts.rows,
        "tokens": counts.tokens,
        "skipped": counts.skipped,
        "first_skipped": counts.first_skipped,
        "files": [p.name for p in writer.shards.files],
        "seconds": round(seconds, 3),
    }


def _report(
    cfg: ExportConfig, writer: FormatWriter, manifest: dict[str, Any], source: Source
) -> None:
    counts = writer.counts
    sidecar = bytes_per_token(source.sidecar_k, source.reader.dtype or "float16")
    rows = [
        ("rows written", console.fmt_int(counts.rows)),
        ("answer tokens", console.fmt_int(counts.tokens)),
        ("files", f"{len(writer.shards.files)} in {cfg.output}"),
        ("size", f"{manifest['bytes'] / 2**20:,.1f} MiB"),
        (f"bytes/token ({cfg.format})", f"{manifest['bytes_per_token']:,.1f}"),
        (f"bytes/token (sidecar, top-{source.sidecar_k})", f"{sidecar:,}"),
        ("rows/s", console.fmt_rate(manifest["rows_per_second"] or 0.0)),
    ]
    console.summary_table(f"openkd export --format {cfg.format}", rows)
    for reason, n in counts.skipped.items():
        console.warn(
            f"{n:,} row(s) left out: {reason} (first: {counts.first_skipped[reason]}); pass "
            "--tokenizer with the chat template the trainer will use"
        )
