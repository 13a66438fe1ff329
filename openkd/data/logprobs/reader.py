"""Memory-mapped, id-indexed reads of one or more sidecars."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openkd.data.logprobs.format import part_files, read_settings
from openkd.errors import OpenkdError

if TYPE_CHECKING:
    import pyarrow as pa


def _hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class _Batch:
    part: int
    ids: Any  # pyarrow StringArray (memory-mapped)
    tok_offsets: np.ndarray
    tok_values: np.ndarray
    top_offsets: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclass(frozen=True)
class TeacherRow:
    """One row's teacher data. Arrays are read-only views of the memory map, but logprobs."""

    token_ids: np.ndarray  # [T] int32
    top_ids: np.ndarray  # [T, K] int32
    top_logprobs: np.ndarray  # [T, K] float32


class SidecarReader:
    """Memory-mapped read access to one or more sidecar directories.

    Opening maps every part and builds an id index (a 64-bit hash and a row number per stored
    row: 16 bytes, plus 8 while sorting); no log-probability is read until `get()` asks for a
    row. A torn last message is skipped (the part is left as it is; `repair()` cuts it).
    Picklable: a copy (e.g. in a data-loader worker) maps the same files again.
    """

    def __init__(self, directories: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]):
        if isinstance(directories, str | os.PathLike):
            directories = [directories]
        self.directories = [Path(d) for d in directories]
        self._open()

    def _open(self) -> None:
        import pyarrow as pa

        self.parts: list[Path] = []
        self._batches: list[_Batch] = []
        self.k: int | None = None
        self.dtype: str | None = None
        self.meta: dict[str, str] = {}
        self.torn: list[Path] = []
        hashes: list[np.ndarray] = []
        for directory in self.directories:
            for path in part_files(directory):
                if path.stat().st_size == 0:
                    continue
                try:
                    source = pa.memory_map(str(path))
                    stream = pa.ipc.open_stream(source)
                except (OSError, EOFError, pa.ArrowInvalid):
                    self.torn.append(path)
                    continue
                k, dtype, meta = read_settings(stream.schema, path)
                if self.k is None:
                    self.k, self.dtype, self.meta = k, dtype, meta
                elif (k, dtype) != (self.k, self.dtype):
                    raise OpenkdError(
                        f"{path} holds top-{k} {dtype} log-probabilities but {self.parts[0]} "
                        f"top-{self.k} {self.dtype}; a sidecar holds one teacher run's settings"
                    )
                index = len(self.parts)
                self.parts.append(path)
                while True:
                    try:
                        batch = stream.read_next_batch()
                    except StopIteration:
                        break
                    except (OSError, pa.ArrowInvalid):
                        self.torn.append(path)
                        break
                    self._batches.append(self._view(index, batch))
                    hashes.append(
                        np.fromiter(
                            (_hash(s) for s in batch.column(0).to_pylist()),
                            dtype=np.uint64,
                            count=batch.num_rows,
                        )
                    )
        counts = np.array([len(b.tok_offsets) - 1 for b in self._batches], dtype=np.int64)
        self._starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._starts[1:])
        flat = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        self._order = np.argsort(flat, kind="stable").astype(np.int64)
        self._sorted = flat[self._order]

    @staticmethod
    def _view(part: int, batch: pa.RecordBatch) -> _Batch:
        def split(column: Any) -> tuple[np.ndarray, np.ndarray]:
            offsets = column.offsets.to_numpy(zero_copy_only=False)
            return offsets, column.values.to_numpy(zero_copy_only=False)

        tok_offsets, tok_values = split(batch.column(1))
        top_offsets, top_ids = split(batch.column(2))
        _, top_logprobs = split(batch.column(3))
        return _Batch(part, batch.column(0), tok_offsets, tok_values, top_offsets, top_ids,
                      top_logprobs)  # fmt: skip

    # pickling: the directories only; the copy maps the files again
    def __getstate__(self) -> dict[str, Any]:
        signature = [(str(p), p.stat().st_size) for p in self.parts if p.exists()]
        return {"directories": [str(d) for d in self.directories], "signature": signature}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directories = [Path(d) for d in state["directories"]]
        self._open()

    @property
    def rows(self) -> int:
        """Rows stored, duplicates and orphans included."""
        return int(self._starts[-1])

    def __len__(self) -> int:
        """Distinct ids stored."""
        return int(np.count_nonzero(np.diff(self._sorted))) + 1 if len(self._sorted) else 0

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.parts if p.exists())

    def _locate(self, row: int) -> tuple[_Batch, int]:
        b = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._batches[b], row - int(self._starts[b])

    def _find(self, row_id: str) -> int | None:
        h = np.uint64(_hash(row_id))
        lo = int(np.searchsorted(self._sorted, h, side="left"))
        hi = int(np.searchsorted(self._sorted, h, side="right"))
        for i in range(lo, hi):
            row = int(self._order[i])
            batch, r = self._locate(row)
            if batch.ids[r].as_py() == row_id:
                return row
        return None

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, str) and self._find(row_id) is not None

    def _row(self, row: int) -> TeacherRow:
        batch, r = self._locate(row)
        t0, t1 = int(batch.tok_offsets[r]), int(batch.tok_offsets[r + 1])
        k0, k1 = int(batch.top_offsets[r]), int(batch.top_offsets[r + 1])
        k = self.k or 0
        if k1 - k0 != (t1 - t0) * k:
            raise OpenkdError(
                f"{self.parts[batch.part]}: row {batch.ids[r].as_py()!r} has {k1 - k0} top-k "
                f"values for {t1 - t0} tokens at k={k}; the file is corrupt, regenerate it"
            )
        return TeacherRow(
            token_ids=batch.tok_values[t0:t1],
            top_ids=batch.top_ids[k0:k1].reshape(t1 - t0, k),
            top_logprobs=batch.top_logprobs[k0:k1].astype(np.float32).reshape(t1 - t0, k),
        )

    def get(self, row_id: str) -> TeacherRow | None:
        """(token_ids [T], top_ids [T, K], top_logprobs [T, K] float32) of a row, or None."""
        row = self._find(row_id)
        return None if row is None else self._row(row)

    def __getitem__(self, row_id: str) -> TeacherRow:
        found = self.get(row_id)
        if found is None:
            raise KeyError(row_id)
        return found

    def token_ids(self, row_id: str) -> np.ndarray | None:
        """Only the completion's token ids of a row (no log-probability is read), or None."""
        row = self._find(row_id)
        if row is None:
            return None
        batch, r = self._locate(row)
        return batch.tok_values[int(batch.tok_offsets[r]) : int(batch.tok_offsets[r + 1])]

    def missing(self, row_ids: Iterable[str]) -> list[str]:
        """The ids of `row_ids` with no stored row, in order (one vectorised index pass).

        Compares the 64-bit hashes only; `get()` also compares the id itself.
        """
        ids = list(row_ids)
        hashes = np.fromiter((_hash(i) for i in ids), dtype=np.uint64, count=len(ids))
        at = np.searchsorted(self._sorted, hashes)
        found = np.zeros(len(ids), dtype=bool)
        inside = at < len(self._sorted)
        found[inside] = self._sorted[at[inside]] == hashes[inside]
        return [ids[i] for i in np.flatnonzero(~found)]

    def __iter__(self) -> Iterator[tuple[str, TeacherRow]]:
        """Every stored id once (its first copy), with its data, in storage order.

        Orphans are included: drive a pass by the JSONL's ids (`get`) to skip them.
        """
        for row in range(self.rows):
            batch, r = self._locate(row)
            row_id = batch.ids[r].as_py()
            if self._find(row_id) == row:  # the first row stored with this id
                yield row_id, self._row(row)
