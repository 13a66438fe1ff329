"""`openkd train --logprobs SET`: an axolotl-kd, DistillKit or plain-Parquet set, read as a sidecar.

The set's format is detected from its files. It is converted once, streaming, into an openkd
sidecar (float32) in a cache directory (`$OPENKD_CACHE`, default `~/.cache/openkd`, under
`logprobs/`), keyed by the set's files (names, sizes, modification times) and, for axolotl sets,
the tokenizer that re-tokenises them; training then reads that sidecar like any other, with the
same pre-flight checks (every row covered, ids inside the student's vocabulary). The set itself
is only read. Rows are matched with `--dataset` by id: an `id` column (axolotl, parquet),
DistillKit files' `openkd.ids` metadata (openkd's exports), else the row number ("0", "1", ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openkd.data.logprobs import SidecarWriter
from openkd.data.logprobs.format import part_files
from openkd.errors import OpenkdError
from openkd.export import axolotl, distillkit, parquet
from openkd.export.sink import META_KEY
from openkd.export.tokens import Tokens

CACHE_ENV = "OPENKD_CACHE"
DONE = "imported.json"
COMMIT_ROWS = 256


def cache_root() -> Path:
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "openkd"


def _natural(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    return sorted((p for p in path.glob("*.parquet") if p.is_file()), key=_natural)


def _columns(files: list[Path]) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not files:
        return []
    try:
        return list(pq.ParquetFile(files[0]).schema_arrow.names)
    except (OSError, pa.ArrowException) as exc:
        raise OpenkdError(f"{files[0]} is not a readable Parquet file ({exc})") from exc


def detect(path: Path) -> str | None:
    """The set's format: sidecar, axolotl-kd, distillkit, parquet; None for none of them."""
    if path.is_dir() and part_files(path):
        return "sidecar"
    names = _columns(parquet_files(path))
    if "compressed_logprobs" in names and "bytepacked_indices" in names:
        return "distillkit"
    if (
        axolotl.IDS_FIELD in names
        and axolotl.logprobs_field(names)
        and axolotl.messages_field(names)
    ):
        return "axolotl-kd"
    if {"id", "token_ids", "top_ids", "top_logprobs"} <= set(names):
        return "parquet"
    return None


def _provenance(files: list[Path]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    stored = (pq.ParquetFile(files[0]).schema_arrow.metadata or {}).get(META_KEY.encode())
    return json.loads(stored) if stored else {}


def _config_file(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    found = folder / distillkit.CONFIG_FILE
    if not found.is_file():
        raise OpenkdError(
            f"--logprobs {path} is a DistillKit set without {distillkit.CONFIG_FILE} beside its "
            "Parquet files; put the compression config it was captured with there"
        )
    return found


def _rows(kind: str, path: Path, files: list[Path], tokens: Tokens | None) -> Iterator[Any]:
    k = _provenance(files).get("k")
    if kind == "distillkit":
        yield from distillkit.read_rows(files, distillkit.read_config(_config_file(path)))
    elif kind == "axolotl-kd":
        assert tokens is not None
        yield from axolotl.read_rows(files, tokens, k)
    else:
        yield from parquet.read_rows(files, k)


def _key(kind: str, path: Path, files: list[Path], tokens: Tokens | None) -> str:
    parts: list[Any] = [kind, str(path.resolve())]
    for f in files + ([_config_file(path)] if kind == "distillkit" else []):
        stat = f.stat()
        parts.append([f.name, stat.st_size, stat.st_mtime_ns])
    if kind == "axolotl-kd" and tokens is not None:
        template = getattr(tokens.tokenizer, "chat_template", "") or ""
        parts += [tokens.name, hashlib.sha256(str(template).encode()).hexdigest()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def convert(path: Path, kind: str, tokens: Tokens | None) -> tuple[Path, dict[str, Any]]:
    """The cached sidecar of the set at `path` (made now if missing), and what was read."""
    files = parquet_files(path)
    dest = cache_root() / "logprobs" / f"{kind}-{_key(kind, path, files, tokens)}"
    if (dest / DONE).is_file():
        return dest, json.loads((dest / DONE).read_text(encoding="utf-8"))
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    provenance = _provenance(files)
    meta = {"imported_from": str(path), "format": kind}
    if provenance.get("teacher"):
        meta["teacher"] = str(provenance["teacher"])
    report: dict[str, Any] = {"source": str(path), "format": kind, "rows": 0, "skipped": 0}
    writer: SidecarWriter | None = None
    try:
        for item in _rows(kind, path, files, tokens):
            if len(item) == 2:
                report["skipped"] += 1
                report.setdefault("first_skipped", f"{item[0]}: {item[1]}")
                continue
            row_id, token_ids, top_ids, top_logprobs = item
            if writer is None:
                tmp.mkdir(parents=True)
                writer = SidecarWriter(tmp, int(top_ids.shape[1]), "float32", meta=meta)
            if top_ids.shape[1] != writer.k:
                raise OpenkdError(
                    f"--logprobs {path}: row {row_id} holds top-{top_ids.shape[1]}, earlier rows "
                    f"top-{writer.k}; a set needs one K"
                )
            writer.add(str(row_id), token_ids, top_ids, top_logprobs)
            report["rows"] += 1
            if writer.pending >= COMMIT_ROWS:
                writer.commit()
        if writer is None:
            raise OpenkdError(
                f"--logprobs {path}: no row of this {kind} set could be read "
                f"({report.get('first_skipped', 'it is empty')})"
            )
        writer.close()
        (tmp / DONE).write_text(json.dumps(report) + "\n", encoding="utf-8")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(dest)
        except OSError:  # another process (a rank of the same launch) made it first
            if not (dest / DONE).is_file():
                raise
    except ValueError as exc:  # a position with fewer values than K
        raise OpenkdError(
            f"--logprobs {path}: {exc}; a set needs one K for every position"
        ) from exc
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest, report


def import_sets(paths: list[Path], tokenizer: Any) -> tuple[list[Path], list[str], list[str]]:
    """(sidecar directories, lines to print, warnings): each set replaced by its cached sidecar."""
    out: list[Path] = []
    lines: list[str] = []
    warnings: list[str] = []
    for path in paths:
        kind = detect(path)
        if kind in (None, "sidecar"):
            out.append(path)
            continue
        tokens = Tokens(tokenizer, str(getattr(tokenizer, "name_or_path", "the student")))
        dest, report = convert(path, kind, tokens if kind == "axolotl-kd" else None)
        out.append(dest)
        lines.append(
            f"{kind} set {path}: {report['rows']:,} rows read into the sidecar {dest} "
            f"(converted once; ${CACHE_ENV} moves the cache)"
        )
        if report["skipped"]:
            warnings.append(
                f"{report['skipped']:,} row(s) of {path} could not be read and are left out "
                f"(first: {report['first_skipped']})"
            )
    return out, lines, warnings
