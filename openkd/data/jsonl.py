"""Crash-safe JSONL files: read naming the bad line, repair a torn tail, replace atomically.

A JSONL file appended to by openkd (`openkd.generate.writer`) is valid up to its last newline
at every moment: a process killed mid-write leaves at most one partial last line, which
`repair_torn_tail` cuts away before the file is appended to again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from openkd.errors import OpenkdError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once, at import, single-threaded
    os.umask(mask)
    return mask


UMASK = _read_umask()


def dumps(row: Mapping[str, Any]) -> str:
    """One JSONL line (without the newline): compact, UTF-8 text kept as is."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def repair_torn_tail(path: Path) -> int:
    """Cut a partial last line (a write killed midway) off `path`; return the bytes removed."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # Walk back block by block to the last newline; everything after it is torn.
        block = 1 << 16
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            chunk = fh.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def iter_jsonl(
    path: Path, *, start: int = 0, first_line: int = 1
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) for each non-blank line; a bad line is an OpenkdError naming it.

    `start` is a byte offset at a line boundary to read from, `first_line` its line number.
    """
    with open(path, "rb") as fh:
        fh.seek(start)
        for lineno, raw in enumerate(fh, first_line):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise OpenkdError(
                    f"{path}:{lineno}: not valid UTF-8; re-encode the file as UTF-8"
                ) from err
            except json.JSONDecodeError as exc:
                raise OpenkdError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or delete that line"
                ) from exc
            if not isinstance(row, dict):
                raise OpenkdError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
                )
            yield lineno, row


class AtomicWriter:
    """Write a file under a temporary name in the same directory, rename it into place on success.

    Used as a context manager; on an exception the temporary file is removed and the target is
    left exactly as it was.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp: Path | None = None
        self.fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._tmp = Path(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~UMASK)
        self.fh = os.fdopen(fd, "w", encoding="utf-8")
        return self.fh

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.fh is not None and self._tmp is not None
        try:
            if exc_type is None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
            self.fh.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
                fsync_dir(self.path.parent)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


def write_jsonl_atomic(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Replace `path` with `rows` in one step; return the number of rows written."""
    n = 0
    with AtomicWriter(path) as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")
            n += 1
    return n


def write_text_atomic(path: Path, text: str) -> None:
    with AtomicWriter(path) as fh:
        fh.write(text)


def read_json_object(path: Path, fix: str) -> dict[str, Any] | None:
    """The JSON object in `path`, None when there is no such file; OpenkdError saying `fix`
    when it cannot be read or holds something else."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OpenkdError(f"{path} is unreadable; {fix}") from err
    if not isinstance(data, dict):
        raise OpenkdError(f"{path} does not hold a JSON object; {fix}")
    return data
