"""The teacher's top-k log-probabilities beside a generate output: the `<stem>.logprobs/` sidecar.

For `--output data/teacher.jsonl` the sidecar is the directory `data/teacher.logprobs/` (one per
output: its train, eval and truncated rows share it; a shard `teacher.shard-0-of-4.jsonl` has
`teacher.shard-0-of-4.logprobs/`). It holds Arrow IPC *stream* files, one per run that wrote
rows, `part-00000.arrow`, `part-00001.arrow`, ..., each a schema message followed by record
batches, one batch per `commit()` (a commit larger than 2^30 values is split in several).
Columns, one row per JSONL row:

    id            string         the JSONL row's id
    token_ids     list<int32>    the completion's token ids as the teacher produced them (T),
                                 its stop token included when it stopped on one
    top_ids       list<int32>    per completion position the teacher's top-K token ids, T*K
                                 values, row-major: they reshape to [T, K]
    top_logprobs  list<float16>  their raw (temperature 1) log-probabilities, same layout
                  (or float32)

K, the log-probability dtype and the format version are in the schema metadata (`k`, `dtype`,
`openkd.format`); any further metadata the writer was given is kept beside them. A position's
K entries are written in descending order of log-probability; readers do not rely on it.

Crash safety is the JSONL writer's: `commit()` writes one batch, flushes and fsyncs, and the
generate writer commits the sidecar *before* it fsyncs the JSONL rows, so a row is never
durable before its log-probabilities. A kill can leave a torn last message in a part;
`repair()` cuts it (as `repair_torn_tail` does for JSONL) and readers stop before it anyway.
Rows in the sidecar but not in the JSONL (committed just before a kill) are orphans: readers
look rows up by the JSONL's ids and never see them. A rerun may write an id again; duplicates
are harmless (greedy decoding gives the same data) and a lookup returns either.

Size: `bytes_per_token(k, dtype)` = 4 (token id) + K * (4 + 2) with float16: 124 bytes at
top-20, so 1M answers of 4k tokens are ~0.5 TB. Hence streaming writes (nothing accumulates
past a commit) and memory-mapped reads: `SidecarReader` keeps an index of 16 bytes per row and
maps the parts; a row's arrays are read from the page cache when asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    return 4 + k * (4 + np.dtype(_dtype(dtype)).itemsize)


def _dtype(dtype: Any) -> Any:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise OpenkdError(
            f"log-probability dtype {name!r} is not supported; use one of {', '.join(DTYPES)}"
        )
    return DTYPES[name]


def schema(k: int, dtype: str = "float16", meta: Mapping[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of every part: columns and metadata (K, dtype, format)."""
    import pyarrow as pa

    value_type = pa.float16() if _dtype(dtype) is np.float16 else pa.float32()
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


def _parts(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if PART_RE.match(p.name) and p.is_file()]
    return sorted(found, key=lambda p: int(PART_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def _fsync_dir(path: Path) -> None:
    from openkd.data.jsonl import fsync_dir

    fsync_dir(path)


def _read_settings(schema_: pa.Schema, where: Path) -> tuple[int, str, dict[str, str]]:
    meta = {k.decode(): v.decode() for k, v in (schema_.metadata or {}).items()}
    if meta.get("openkd.format") != FORMAT or "k" not in meta or "dtype" not in meta:
        raise OpenkdError(
            f"{where} is not an openkd log-probability file ({FORMAT}); remove it from the "
            "sidecar directory"
        )
    return int(meta["k"]), meta["dtype"], meta


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
        self.dtype = np.dtype(_dtype(dtype)).name
        self.schema = schema(self.k, self.dtype, meta)
        existing = _parts(self.directory)
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
        _fsync_dir(self.directory)
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
    return _read_settings(schema_, path)


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


def repair(directory: str | os.PathLike[str]) -> int:
    """Cut each part's torn last message (a write killed midway); return the bytes removed.

    A part left without a complete schema message (killed at its first write) is deleted.
    """
    directory = Path(directory)
    cut = 0
    for part in _parts(directory):
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
        _fsync_dir(directory)
    return cut


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
            for path in _parts(directory):
                if path.stat().st_size == 0:
                    continue
                try:
                    source = pa.memory_map(str(path))
                    stream = pa.ipc.open_stream(source)
                except (OSError, EOFError, pa.ArrowInvalid):
                    self.torn.append(path)
                    continue
                k, dtype, meta = _read_settings(stream.schema, path)
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


def top_k_arrays(
    positions: Sequence[Mapping[int, float]], k: int, dtype: str = "float16"
) -> tuple[np.ndarray, np.ndarray]:
    """[T, K] ids and log-probabilities from per-position {token id: log-probability} maps.

    Keeps each position's K most likely entries in descending order (an engine may add the
    sampled token as a K+1-th entry). A position with fewer than K entries is an error.
    """
    ids = np.zeros((len(positions), k), dtype=np.int32)
    logprobs = np.zeros((len(positions), k), dtype=DTYPES[np.dtype(_dtype(dtype)).name])
    for t, entries in enumerate(positions):
        if len(entries) < k:
            raise ValueError(f"position {t} has {len(entries)} log-probabilities, fewer than {k}")
        best = sorted(entries.items(), key=lambda item: -item[1])[:k]
        ids[t] = [token for token, _ in best]
        logprobs[t] = [value for _, value in best]
    return ids, logprobs


@dataclass(frozen=True)
class MergeReport:
    parts: int
    rows: int
    bytes: int


def merge(
    sidecar_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> MergeReport:
    """Join the sidecars of `openkd generate --shard i/n` outputs into `out_dir`.

    Parts are taken whole (hard-linked when the file system allows, else copied), up to the end
    of their last complete message, and renumbered in input order. Ids must be unique across
    the inputs (a duplicate inside one sidecar is a harmless rerun copy); the first id found in
    two inputs stops the merge, naming both. `out_dir` is replaced only when all went well.
    """
    inputs = [Path(d) for d in sidecar_dirs]
    out = Path(out_dir)
    readers: list[SidecarReader] = []
    for directory in inputs:
        if not directory.is_dir():
            raise OpenkdError(f"{directory}: no such sidecar directory; pass existing ones")
        if directory.resolve() == out.resolve():
            raise OpenkdError(f"{out} is also an input sidecar; merge into another directory")
        readers.append(SidecarReader(directory))
    settings = {(r.k, r.dtype) for r in readers if r.k is not None}
    if len(settings) > 1:
        shown = ", ".join(f"{d} top-{r.k} {r.dtype}" for d, r in zip(inputs, readers, strict=True))
        raise OpenkdError(
            f"the sidecars hold different top-k settings ({shown}); merge shards of one run only"
        )
    _check_unique(inputs, readers)

    tmp = out.with_name(f".{out.name}.merge-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    number = total = 0
    try:
        for reader in readers:
            for part in reader.parts:
                keep, _ = scan_part(part)
                if keep == 0:
                    continue
                target = tmp / f"part-{number:05d}.arrow"
                _link_or_copy(part, target, keep)
                number += 1
                total += keep
        _fsync_dir(tmp)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeReport(parts=number, rows=sum(r.rows for r in readers), bytes=total)


def merge_beside(
    shards: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]
) -> MergeReport | None:
    """`openkd merge`'s part: join the shards' sidecars into the output's; None when none has one.

    Either every shard has a sidecar or none does (a merged output with log-probabilities for
    only some rows could not train with --loss soft|mix).
    """
    found = [sidecar_dir(shard) for shard in shards]
    present = [d for d in found if d.is_dir()]
    if not present:
        return None
    if len(present) != len(found):
        lacking = next(Path(s) for s, d in zip(shards, found, strict=True) if not d.is_dir())
        raise OpenkdError(
            f"{lacking} has no {sidecar_dir(lacking).name}/ but other shards have "
            "log-probabilities; regenerate that shard with the same --logprobs K, or move the "
            "shards' .logprobs/ directories away to merge without them"
        )
    return merge(present, sidecar_dir(output))


def _check_unique(inputs: list[Path], readers: list[SidecarReader]) -> None:
    hashes, owners = [], []
    for index, reader in enumerate(readers):
        distinct = np.unique(reader._sorted)
        hashes.append(distinct)
        owners.append(np.full(len(distinct), index, dtype=np.int64))
    if not hashes:
        return
    flat = np.concatenate(hashes)
    owner = np.concatenate(owners)
    order = np.argsort(flat, kind="stable")
    flat, owner = flat[order], owner[order]
    for i in np.flatnonzero(flat[1:] == flat[:-1]):
        a, b = readers[owner[i]], readers[owner[i + 1]]
        ids_a = {
            a._locate(int(r))[0].ids[a._locate(int(r))[1]].as_py()
            for r in a._order[a._sorted == flat[i]]
        }
        for r in b._order[b._sorted == flat[i]]:
            batch, j = b._locate(int(r))
            row_id = batch.ids[j].as_py()
            if row_id in ids_a:
                raise OpenkdError(
                    f"duplicate id {row_id} in {inputs[owner[i]]} and {inputs[owner[i + 1]]}; "
                    "merge each shard's sidecar once (shards of one run never share ids)"
                )


def _link_or_copy(source: Path, target: Path, nbytes: int) -> None:
    if source.stat().st_size == nbytes:
        with contextlib.suppress(OSError):
            os.link(source, target)
            return
    with open(source, "rb") as src, open(target, "wb") as dst:
        left = nbytes
        while left > 0:
            chunk = src.read(min(left, 1 << 24))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
