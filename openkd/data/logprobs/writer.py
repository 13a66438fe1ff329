"""Appending to a sidecar (one part per writer, one batch per commit) and repairing it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openkd.data.jsonl import fsync_dir
from openkd.data.logprobs.format import (
    DTYPES,
    MAX_BATCH_VALUES,
    PART_RE,
    part_files,
    read_part_settings,
    scan_part,
    schema,
    value_dtype,
)
from openkd.errors import OpenkdError

if TYPE_CHECKING:
    import pyarrow as pa


class SidecarWriter:
    """Append rows of top-K log-probabilities to a sidecar directory, one new part per writer.

    `add()` buffers a row; `commit()` writes the buffered rows as one record batch, flushes and
    fsyncs, and returns the bytes it wrote; `close()` commits what is left and ends the stream.
    The part file is created at the first commit that has rows, so a run that writes nothing
    leaves nothing. Parts already in the directory must have the same K and dtype.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        k: int,
        dtype: str = "float16",
        meta: Mapping[str, str] | None = None,
    ) -> None:
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.directory = Path(directory)
        self.k = int(k)
        self.dtype = np.dtype(value_dtype(dtype)).name
        self.schema = schema(self.k, self.dtype, meta)
        existing = part_files(self.directory)
        for part in existing:
            found = read_part_settings(part)
            if found is not None and found[:2] != (self.k, self.dtype):
                raise OpenkdError(
                    f"{self.directory} holds top-{found[0]} {found[1]} log-probabilities, this "
                    f"run writes top-{self.k} {self.dtype}; keep the same --logprobs K, or "
                    "write to another --output"
                )
        numbers = [int(PART_RE.match(p.name).group(1)) for p in existing]  # type: ignore[union-attr]
        self.path = self.directory / f"part-{(max(numbers) + 1) if numbers else 0:05d}.arrow"
        self.bytes_written = 0
        self.rows_written = 0
        self._rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self._fh: Any = None
        self._stream: Any = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Rows added since the last commit."""
        return len(self._rows)

    def add(self, row_id: str, token_ids: Any, top_ids: Any, top_logprobs: Any) -> None:
        """Buffer one row: token_ids [T], top_ids [T, K] and top_logprobs [T, K]."""
        if self._closed:
            raise ValueError("add() on a closed SidecarWriter")
        tokens = np.asarray(token_ids)
        ids = np.asarray(top_ids)
        logprobs = np.asarray(top_logprobs)
        t = tokens.shape[0] if tokens.ndim == 1 else -1
        if tokens.ndim != 1 or ids.shape != (t, self.k) or logprobs.shape != (t, self.k):
            raise ValueError(
                f"row {row_id!r}: expected token_ids [T], top_ids and top_logprobs [T, {self.k}]; "
                f"got {tokens.shape}, {ids.shape}, {logprobs.shape}"
            )
        if t and (min(tokens.min(), ids.min()) < 0 or max(tokens.max(), ids.max()) >= 2**31):
            raise ValueError(f"row {row_id!r}: token ids must be in [0, 2^31)")
        self._rows.append(
            (
                str(row_id),
                tokens.astype(np.int32, copy=False),
                ids.astype(np.int32, copy=False).reshape(-1),
                logprobs.astype(DTYPES[self.dtype], copy=False).reshape(-1),
            )
        )

    def commit(self) -> int:
        """Write the buffered rows, flush and fsync; the bytes written (0 when none were buffered)."""
        if not self._rows:
            return 0
        if self._closed:
            raise ValueError("commit() on a closed SidecarWriter")
        if self._fh is None:
            self._open()
        start = self._fh.tell()
        for batch in self._batches():
            self._stream.write_batch(batch)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        written = self._fh.tell() - start
        self.bytes_written += written
        self.rows_written += len(self._rows)
        self._rows = []
        return written

    def _open(self) -> None:
        import pyarrow as pa

        self.directory.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "xb")  # noqa: SIM115 (closed in close()); never clobbers a part
        fsync_dir(self.directory)
        self._stream = pa.ipc.new_stream(self._fh, self.schema)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        """The buffered rows as record batches, each list column under MAX_BATCH_VALUES values."""
        start = 0
        while start < len(self._rows):
            end, values = start, 0
            while end < len(self._rows) and (
                end == start or values + self._rows[end][2].size < MAX_BATCH_VALUES
            ):
                values += self._rows[end][2].size
                end += 1
            yield self._batch(self._rows[start:end])
            start = end

    def _batch(self, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> pa.RecordBatch:
        import pyarrow as pa

        lengths = np.fromiter((len(r[1]) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        def column(index: int, scale: int, dtype: Any) -> pa.Array:
            values = np.concatenate([r[index] for r in rows]) if rows else np.zeros(0, dtype)
            return pa.ListArray.from_arrays(
                pa.array((offsets * scale).astype(np.int32)), pa.array(values.astype(dtype))
            )

        return pa.record_batch(
            [
                pa.array([r[0] for r in rows], type=pa.string()),
                column(1, 1, np.int32),
                column(2, self.k, np.int32),
                column(3, self.k, DTYPES[self.dtype]),
            ],
            schema=self.schema,
        )

    def close(self) -> None:
        """Commit what is buffered and end the stream (idempotent)."""
        if self._closed:
            return
        try:
            self.commit()
            if self._stream is not None:
                self._stream.close()  # writes the end-of-stream marker
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self.bytes_written = self._fh.tell()
        finally:
            if self._fh is not None:
                self._fh.close()
            self._closed = True

    def __enter__(self) -> SidecarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair(directory: str | os.PathLike[str]) -> int:
    """Cut each part's torn last message (a write killed midway); return the bytes removed.

    A part left without a complete schema message (killed at its first write) is deleted.
    """
    directory = Path(directory)
    cut = 0
    for part in part_files(directory):
        keep, torn = scan_part(part)
        size = part.stat().st_size
        if keep == 0 and (torn or size == 0):
            part.unlink()
            cut += size
            continue
        if torn:
            with open(part, "rb+") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
            cut += size - keep
    if cut:
        fsync_dir(directory)
    return cut
