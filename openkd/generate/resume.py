"""What earlier runs left, read in seconds at any size: ids labelled, their counts, failures.

Two derived files beside the output make a rerun fast (both are safe to delete):

    <stem>.ids    the 16-byte id of every row written, in commit order
    <stem>.index  JSON: how far into each row file those ids reach (bytes), the file's identity
                  there (inode, CRC-32 of the 4 KiB before that offset), per-kind counts, and the
                  selection a completed pass labelled in full

Rerunning a finished 1M-row run reads 16 MB of ids instead of parsing 1M JSON rows. Rows
appended after the index was last written (a kill between the two fsyncs) are parsed from the
files' tails; a file that shrank, was replaced or edited makes the index stale, and it is rebuilt
from the files. Reading also repairs: a last line torn by a kill is cut away first.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from openkd.data.jsonl import fsync_dir, iter_jsonl, repair_torn_tail, write_text_atomic
from openkd.data.layout import ROW_KINDS, OutputFiles
from openkd.data.metadata import Counts
from openkd.data.schema import FailureRow, LabelledRow
from openkd.errors import OpenkdError
from openkd.generate.ids import KEY_BYTES, KEY_DTYPE, IdSet, to_keys

if TYPE_CHECKING:
    from openkd.generate.config import GenerateConfig

INDEX_FORMAT = "openkd.index/1"
CHECK_BYTES = 4096


@dataclass
class FileMark:
    """How far the index covers one file, and what the file looked like there."""

    size: int = 0
    inode: int = 0
    crc: int = 0

    @classmethod
    def of(cls, path: Path) -> FileMark:
        """The mark of `path` as it is now (size 0 when it does not exist)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return cls()
        return cls(size=st.st_size, inode=st.st_ino, crc=_tail_crc(path, st.st_size))

    def matches(self, path: Path) -> bool:
        """True when `path` still starts with what this mark covered."""
        if self.size == 0:
            return True
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        return (
            st.st_size >= self.size
            and st.st_ino == self.inode
            and _tail_crc(path, self.size) == self.crc
        )


def _tail_crc(path: Path, end: int) -> int:
    with open(path, "rb") as fh:
        start = max(0, end - CHECK_BYTES)
        fh.seek(start)
        return zlib.crc32(fh.read(end - start))


@dataclass
class Index:
    """The contents of `<stem>.index`."""

    marks: dict[str, FileMark] = field(default_factory=lambda: {k: FileMark() for k in ROW_KINDS})
    counts: Counts = field(default_factory=Counts)  # the row files' tallies (failed unused)
    ids: int = 0  # ids in <stem>.ids that the marks cover
    # The last selection a pass labelled completely (no failures), for a fast no-op rerun.
    selection: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = {
            "format": INDEX_FORMAT,
            "ids": self.ids,
            "files": {k: asdict(m) for k, m in self.marks.items()},
            "counts": self.counts.to_json(),
            "selection": self.selection,
        }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def read(cls, path: Path) -> Index | None:
        """The index at `path`, or None when it is missing or unusable (it is then rebuilt)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != INDEX_FORMAT:
                return None
            return cls(
                marks={k: FileMark(**data["files"][k]) for k in ROW_KINDS},
                counts=Counts.from_json(data["counts"]),
                ids=int(data["ids"]),
                selection=data.get("selection"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        write_text_atomic(path, self.to_json())


@dataclass
class ResumeState:
    done: IdSet  # every labelled row's id
    index: Index  # up to date with the row files on disk
    failed: dict[str, FailureRow] = field(default_factory=dict)  # earlier, not yet answered
    repaired: list[tuple[Path, int]] = field(default_factory=list)
    rebuilt: bool = False  # the index was missing or stale and was rebuilt from the files

    @property
    def has_rows(self) -> bool:
        return len(self.done) > 0

    @property
    def counts(self) -> Counts:
        return self.index.counts


def empty_state() -> ResumeState:
    return ResumeState(done=IdSet(), index=Index())


def load_state(files: OutputFiles) -> ResumeState:
    """Repair torn tails, read the index (rebuilding it if stale), and the failures file."""
    repaired = []
    for path in (*files.row_files, files.failed):
        cut = repair_torn_tail(path)
        if cut:
            repaired.append((path, cut))
    found = Index.read(files.index)
    known = b""
    if found is not None and all(found.marks[k].matches(files.kind_path(k)) for k in ROW_KINDS):
        known = _read_ids(files.ids, found.ids)
    rebuilt = found is None or len(known) != found.ids * KEY_BYTES
    index = Index() if rebuilt or found is None else found
    if rebuilt:
        known = b""
    new_ids: list[str] = []
    for kind in ROW_KINDS:
        path = files.kind_path(kind)
        if not path.is_file() or path.stat().st_size == index.marks[kind].size:
            continue
        first_line = index.counts.of(kind).rows + 1  # exact unless the file has blank lines
        for lineno, row in iter_jsonl(path, start=index.marks[kind].size, first_line=first_line):
            new_ids.append(_row_id(row, path, lineno))
            index.counts.of(kind).add(cast(LabelledRow, row))
        index.marks[kind] = FileMark.of(path)
    if new_ids or rebuilt:
        index.selection = None
        added = to_keys(new_ids).tobytes() if new_ids else b""
        if added or known or files.ids.exists():  # nothing to record: leave no file behind
            _save_ids(files, known, added, replace=rebuilt)
        known += added
        index.ids = len(known) // KEY_BYTES
        if index.ids or files.index.exists():
            index.write(files.index)
    import numpy as np

    done = IdSet(np.frombuffer(known, dtype=KEY_DTYPE), spill_dir=files.output.parent)
    del known
    state = ResumeState(
        done=done, index=index, repaired=repaired, rebuilt=rebuilt and len(done) > 0
    )
    state.failed = _read_failed(files.failed, done)
    return state


def _is_key(rid: str) -> bool:
    if len(rid) != 2 * KEY_BYTES:
        return False
    try:
        bytes.fromhex(rid)
    except ValueError:
        return False
    return True


def _row_id(row: dict[str, Any], path: Path, lineno: int) -> str:
    rid = row.get("id")
    if not isinstance(rid, str) or not _is_key(rid):
        raise OpenkdError(
            f"{path}:{lineno}: row has no openkd 'id'; this is not an openkd output, "
            "pass --overwrite or another --output"
        )
    return rid


def _read_ids(path: Path, count: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(count * KEY_BYTES)
    except FileNotFoundError:
        return b""


def _save_ids(files: OutputFiles, known: bytes, added: bytes, *, replace: bool) -> None:
    """Make `<stem>.ids` hold exactly `known + added`, durably."""
    if replace:
        tmp = files.ids.with_name(files.ids.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(known + added)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, files.ids)
        fsync_dir(files.ids.parent)
        return
    append_ids(files.ids, added, at=len(known))


def append_ids(path: Path, keys: bytes, *, at: int) -> None:
    """Write `keys` at byte `at` of the ids file (dropping anything after it) and fsync."""
    new = not path.exists()
    with open(path, "r+b" if not new else "wb") as fh:
        fh.truncate(at)
        fh.seek(at)
        fh.write(keys)
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)


def _read_failed(path: Path, done: IdSet) -> dict[str, FailureRow]:
    """Failures of earlier runs that no later run answered (the last report of each wins)."""
    if not path.is_file():
        return {}
    rows: dict[str, FailureRow] = {}
    for _, row in iter_jsonl(path):
        rid = row.get("id")
        if isinstance(rid, str) and _is_key(rid):
            rows[rid] = cast(FailureRow, row)
    if not rows or not len(done):
        return rows
    ids = list(rows)
    answered = done.contains(to_keys(ids)).tolist()
    return {rid: rows[rid] for rid, hit in zip(ids, answered, strict=True) if not hit}


def selection_key(cfg: GenerateConfig, stamp: str, sampling: dict[str, Any]) -> str:
    """What decides which rows a run labels and where they go: the dataset's files (`stamp`),
    how prompts are built and selected, the teacher and its sampling."""
    import hashlib

    from openkd.generate.rerun import POLICY

    settings = cfg.to_yaml_dict()
    # Everything that decides which rows exist and where they are; only what merely continues
    # (engine, server, Hub, output name) is left out.
    fields = sorted(name for name, policy in POLICY.items() if policy != "continues")
    payload = {"stamp": stamp, "sampling": sampling, **{f: settings.get(f) for f in fields}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def finished_selection(files: OutputFiles, key: str) -> dict[str, Any] | None:
    """The record of an earlier pass that labelled this exact selection in full, if the output
    is untouched since (no failures pending, every row file as the index left it); else None.

    It lets a rerun of a finished run skip reading the dataset: nothing can have changed.
    """
    index = Index.read(files.index)
    if index is None or not index.selection or index.selection.get("key") != key:
        return None
    if files.failed.exists() and files.failed.stat().st_size:
        return None
    for kind in ROW_KINDS:
        path, mark = files.kind_path(kind), index.marks[kind]
        size = path.stat().st_size if path.exists() else 0
        if size != mark.size or not mark.matches(path):
            return None
    return index.selection
