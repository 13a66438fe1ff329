"""Re-sort the rows already written when --eval-fraction or --keep-truncated changed.

Rows are moved between the train, eval and truncated files to where this run's routing puts
them, without asking the teacher again. A kill at any moment loses no row: every row is first
appended to the file it belongs in (fsynced), and only then removed from the files it left; a
marker file (`<stem>.resplit`) makes the next run finish an interrupted re-sort, which also
drops the duplicates such a kill leaves. The id index is derived and is rebuilt afterwards.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from openkd.data.jsonl import dumps, fsync_dir, iter_jsonl, repair_torn_tail, write_jsonl_atomic
from openkd.data.schema import LabelledRow

if TYPE_CHECKING:
    from openkd.data.layout import OutputFiles
    from openkd.generate.label import Routing

KINDS = ("train", "eval", "truncated")


def resplit(files: OutputFiles, routing: Routing) -> Counter[tuple[str, str]]:
    """Put every train/eval/truncated row where `routing` sends it; the moves, by (from, to)."""
    _touch_durably(files.resplit)
    for kind in KINDS:
        repair_torn_tail(files.kind_path(kind))
    # Where each row is (a bit per kind: a kill between the steps below leaves a row in two
    # files), and where it belongs.
    where: dict[str, int] = {}
    target: dict[str, str] = {}
    for bit, kind in enumerate(KINDS):
        for row in _rows(files, kind):
            rid = row["id"]
            where[rid] = where.get(rid, 0) | (1 << bit)
            target.setdefault(rid, routing.kind(row))
    moves: Counter[tuple[str, str]] = Counter()
    _append_missing(files, where, target, moves)
    for kind in KINDS:
        _keep_only(files, kind, target)
    for derived in (files.index, files.ids):
        derived.unlink(missing_ok=True)
    files.resplit.unlink()
    fsync_dir(files.resplit.parent)
    return moves


def _rows(files: OutputFiles, kind: str) -> Iterator[LabelledRow]:
    path = files.kind_path(kind)
    if path.is_file():
        for _, row in iter_jsonl(path):
            yield cast(LabelledRow, row)


def _append_missing(
    files: OutputFiles,
    where: dict[str, int],
    target: dict[str, str],
    moves: Counter[tuple[str, str]],
) -> None:
    """Step 1: append each row that is not yet in the file it belongs in, and fsync."""
    handles: dict[str, Any] = {}
    try:
        for kind in KINDS:
            for row in _rows(files, kind):
                rid, goes = row["id"], target[row["id"]]
                bit = 1 << KINDS.index(goes)
                if goes == kind or where[rid] & bit:
                    continue
                if goes not in handles:
                    handles[goes] = open(files.kind_path(goes), "a", encoding="utf-8")  # noqa: SIM115
                handles[goes].write(dumps(row) + "\n")
                where[rid] |= bit
                moves[(kind, goes)] += 1
    finally:
        for fh in handles.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
    if handles:
        fsync_dir(files.output.parent)


def _keep_only(files: OutputFiles, kind: str, target: dict[str, str]) -> None:
    """Step 2: rewrite one file with only the rows that belong in it, each once."""
    path = files.kind_path(kind)
    if not path.is_file():
        return
    seen: set[str] = set()
    stays = total = 0
    for row in _rows(files, kind):
        total += 1
        if target[row["id"]] == kind and row["id"] not in seen:
            seen.add(row["id"])
            stays += 1
    if stays == total:
        return
    if stays == 0 and kind != "train":
        path.unlink()
        return
    seen.clear()

    def kept() -> Iterator[LabelledRow]:
        for row in _rows(files, kind):
            if target[row["id"]] == kind and row["id"] not in seen:
                seen.add(row["id"])
                yield row

    write_jsonl_atomic(path, kept())


def _touch_durably(path: Path) -> None:
    with open(path, "w") as fh:
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
