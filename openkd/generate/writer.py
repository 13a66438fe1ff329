"""Write each answer as it lands; make them durable together, at most every `commit_interval`.

Answers are buffered in memory and committed as a group: the row files are appended and
fsynced, then the new ids go to `<stem>.ids` and `<stem>.index` is replaced. A commit is due
`commit_interval` seconds after the previous one (the labelling loop wakes up for it even while
no answer arrives) and at exit, so a kill loses at most that interval of finished answers, and a
1M-row run pays about one fsync per second instead of one per row or batch. A fast teacher's
rows are handed to the files every `SPILL_ROWS` rows in between (no fsync), so the buffer stays
small at any speed. With `--logprobs` the rows' log-probabilities go to the sidecar
(`openkd.data.logprobs`), committed before the rows are written: a row is never durable before
its log-probabilities.

A write that fails (disk full, quota, I/O error) raises one OpenkdError naming the file and
the free space; rows already committed stay, a line torn by the failed write is cut by the next
run, and rows not in the index are found again from the files' tails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from openkd.data.jsonl import dumps, fsync_dir
from openkd.data.layout import ROW_KINDS, OutputFiles
from openkd.data.logprobs import SidecarWriter
from openkd.data.metadata import Tally
from openkd.data.schema import FailureRow, LabelledRow
from openkd.errors import OpenkdError
from openkd.generate.backends.base import TokenLogprobs
from openkd.generate.ids import KEY_BYTES, to_keys
from openkd.generate.resume import FileMark, Index, append_ids

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
SPILL_ROWS = 2048


class WriteFailed(OpenkdError):
    """The output could not be written; the message names the file and the fix."""


def write_error(path: Path, err: OSError) -> WriteFailed:
    rerun = "then rerun the same command to continue (committed rows are kept)"
    if err.errno in FULL:
        try:
            free = f"{_bytes(shutil.disk_usage(path.parent).free)} free"
        except OSError:
            free = "free space unknown"
        return WriteFailed(
            f"disk full writing {path} ({free} on its file system); free some space or "
            f"pass --output on another disk, {rerun}"
        )
    return WriteFailed(f"cannot write {path} ({err.strerror or err}); fix the problem, {rerun}")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


class OutputWriter:
    """Buffered rows per file, committed together; the index always describes what is on disk."""

    def __init__(
        self,
        files: OutputFiles,
        index: Index,
        commit_interval: float,
        clock: Callable[[], float] = time.monotonic,
        sidecar: SidecarWriter | None = None,
    ) -> None:
        self.files = files
        self.index = index
        self.sidecar = sidecar
        self.soft_tokens = 0  # answer tokens whose log-probabilities went to the sidecar
        self.interval = commit_interval
        self._clock = clock
        self._lines: dict[str, list[str]] = {kind: [] for kind in (*ROW_KINDS, "failed")}
        self._tallies: dict[str, Tally] = {kind: Tally() for kind in ROW_KINDS}
        self._ids: list[str] = []
        self._handles: dict[str, IO[bytes]] = {}
        self._unsynced: set[str] = set()  # kinds written since the last commit
        self._buffered = 0
        self._next_commit = clock() + commit_interval
        self.commits = 0

    # -- buffering ---------------------------------------------------------------------------

    def add(self, kind: str, record: LabelledRow, logprobs: TokenLogprobs | None = None) -> None:
        """A labelled row for the train, eval or truncated file (and its log-probabilities)."""
        if self.sidecar is not None and logprobs is not None:
            self.sidecar.add(
                record["id"], logprobs.token_ids, logprobs.top_ids, logprobs.top_logprobs
            )
            self.soft_tokens += len(logprobs.token_ids)
        self._lines[kind].append(dumps(record))
        self._ids.append(record["id"])
        self._tallies[kind].add(record)
        self._count_buffered()

    def add_failure(self, row: FailureRow) -> None:
        self._lines["failed"].append(dumps(row))
        self._count_buffered()

    def _count_buffered(self) -> None:
        self._buffered += 1
        if self._buffered >= SPILL_ROWS:
            self._write_out()

    def seconds_to_commit(self) -> float:
        return self._next_commit - self._clock()

    def commit_if_due(self) -> None:
        if self._clock() >= self._next_commit:
            self.commit()

    # -- committing --------------------------------------------------------------------------

    def commit(self) -> None:
        """Make every buffered row durable, then record it in the index."""
        self._next_commit = self._clock() + self.interval
        self._write_out()
        written, self._unsynced = sorted(self._unsynced), set()
        if not written:
            return
        for kind in written:
            try:
                fh = self._handles[kind]
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as err:
                raise write_error(self.files.kind_path(kind), err) from err
        rows = [kind for kind in written if kind != "failed"]
        if rows:
            self._commit_index(rows)
        self.commits += 1

    def _write_out(self) -> None:
        """Hand the buffered rows to the files (durable at the next commit)."""
        self._buffered = 0
        if self.sidecar is not None and self.sidecar.pending:
            try:
                self.sidecar.commit()
            except OSError as err:
                raise write_error(self.sidecar.path, err) from err
        for kind, lines in self._lines.items():
            if not lines:
                continue
            data = ("\n".join(lines) + "\n").encode("utf-8")
            self._lines[kind] = []
            self._unsynced.add(kind)
            try:
                self._handle(kind).write(data)
            except OSError as err:
                raise write_error(self.files.kind_path(kind), err) from err

    def _commit_index(self, kinds: list[str]) -> None:
        index = self.index
        keys = to_keys(self._ids).tobytes()
        self._ids = []
        try:
            append_ids(self.files.ids, keys, at=index.ids * KEY_BYTES)
            index.ids += len(keys) // KEY_BYTES
            for kind in kinds:
                index.marks[kind] = FileMark.of(self.files.kind_path(kind))
                total = index.counts.of(kind)
                total += self._tallies[kind]  # in place: the index's tally grows
                self._tallies[kind] = Tally()
            index.selection = None
            index.write(self.files.index)
        except OSError as err:
            raise write_error(self.files.index, err) from err

    def _handle(self, kind: str) -> IO[bytes]:
        fh = self._handles.get(kind)
        if fh is None:
            path = self.files.kind_path(kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            fh = open(path, "ab")  # noqa: SIM115 (closed in close())
            if new:
                fsync_dir(path.parent)
            self._handles[kind] = fh
        return fh

    def close(self) -> None:
        if self.sidecar is not None:
            with contextlib.suppress(OSError):  # a failed write was reported when it happened
                self.sidecar.close()
        for fh in self._handles.values():
            # A failed flush was reported by the commit that hit it.
            with contextlib.suppress(OSError):
                fh.close()
        self._handles = {}
