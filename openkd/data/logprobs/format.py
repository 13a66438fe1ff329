"""The sidecar's on-disk format: schema, settings, part files, torn-tail scan, top-K arrays."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openkd.data.layout import OutputFiles
from openkd.errors import OpenkdError

if TYPE_CHECKING:
    import pyarrow as pa

FORMAT = "openkd.logprobs/1"
PART_RE = re.compile(r"^part-(\d{5,})\.arrow$")
DTYPES = {"float16": np.float16, "float32": np.float32}
# Reserved schema metadata keys; a writer's own `meta` may not use them.
RESERVED = ("openkd.format", "k", "dtype")
# Values of one list column in one record batch stay below this (Arrow list offsets are int32).
MAX_BATCH_VALUES = 1 << 30


def sidecar_dir(jsonl: str | os.PathLike[str]) -> Path:
    """The sidecar directory of a generate output, also for its `.eval`/`.truncated` files."""
    return OutputFiles.of_file(Path(jsonl)).logprobs


def bytes_per_token(k: int, dtype: str = "float16") -> int:
    """Sidecar bytes per completion token: the token id, K ids and K log-probabilities."""
    return 4 + k * (4 + np.dtype(value_dtype(dtype)).itemsize)


def value_dtype(dtype: Any) -> Any:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise OpenkdError(
            f"log-probability dtype {name!r} is not supported; use one of {', '.join(DTYPES)}"
        )
    return DTYPES[name]


def schema(k: int, dtype: str = "float16", meta: Mapping[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of every part: columns and metadata (K, dtype, format)."""
    import pyarrow as pa

    value_type = pa.float16() if value_dtype(dtype) is np.float16 else pa.float32()
    extra = dict(meta or {})
    clash = [key for key in extra if key in RESERVED]
    if clash:
        raise ValueError(f"sidecar metadata key {clash[0]!r} is reserved")
    metadata = {**extra, "openkd.format": FORMAT, "k": str(int(k)), "dtype": np.dtype(dtype).name}
    return pa.schema(
        [
            ("id", pa.string()),
            ("token_ids", pa.list_(pa.int32())),
            ("top_ids", pa.list_(pa.int32())),
            ("top_logprobs", pa.list_(value_type)),
        ],
        metadata=metadata,
    )


def part_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if PART_RE.match(p.name) and p.is_file()]
    return sorted(found, key=lambda p: int(PART_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def read_settings(schema_: pa.Schema, where: Path) -> tuple[int, str, dict[str, str]]:
    meta = {k.decode(): v.decode() for k, v in (schema_.metadata or {}).items()}
    if meta.get("openkd.format") != FORMAT or "k" not in meta or "dtype" not in meta:
        raise OpenkdError(
            f"{where} is not an openkd log-probability file ({FORMAT}); remove it from the "
            "sidecar directory"
        )
    return int(meta["k"]), meta["dtype"], meta


def read_part_settings(path: Path) -> tuple[int, str, dict[str, str]] | None:
    """(K, dtype, metadata) of a part, or None when it has no complete schema message."""
    import pyarrow as pa

    if path.stat().st_size == 0:
        return None
    try:
        with pa.memory_map(str(path)) as source:
            message = pa.ipc.read_message(source)
            schema_ = pa.ipc.read_schema(message)
    except (OSError, EOFError, pa.ArrowInvalid):
        return None
    return read_settings(schema_, path)


def scan_part(path: Path) -> tuple[int, bool]:
    """(bytes up to the end of the last complete message, whether a torn message follows).

    Walks the stream's messages with `pyarrow.ipc.read_message` on a memory map: message bodies
    are not read, so this costs one page per message, not the file's size.
    """
    import pyarrow as pa

    size = path.stat().st_size
    if size == 0:
        return 0, False
    end = 0
    with pa.memory_map(str(path)) as source:
        while True:
            try:
                message = pa.ipc.read_message(source)
            except EOFError:  # end of the file, or the end-of-stream marker
                return (size if source.tell() >= size else source.tell()), False
            except (OSError, pa.ArrowInvalid):
                return end, True
            if message is None:
                return end, False
            end = source.tell()


def top_k_arrays(
    positions: Sequence[Mapping[int, float]], k: int, dtype: str = "float16"
) -> tuple[np.ndarray, np.ndarray]:
    """[T, K] ids and log-probabilities from per-position {token id: log-probability} maps.

    Keeps each position's K most likely entries in descending order (an engine may add the
    sampled token as a K+1-th entry). A position with fewer than K entries is an error.
    """
    ids = np.zeros((len(positions), k), dtype=np.int32)
    logprobs = np.zeros((len(positions), k), dtype=DTYPES[np.dtype(value_dtype(dtype)).name])
    for t, entries in enumerate(positions):
        if len(entries) < k:
            raise ValueError(f"position {t} has {len(entries)} log-probabilities, fewer than {k}")
        best = sorted(entries.items(), key=lambda item: -item[1])[:k]
        ids[t] = [token for token, _ in best]
        logprobs[t] = [value for _, value in best]
    return ids, logprobs
