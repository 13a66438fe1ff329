"""Where an export goes: a staging directory renamed into place, and rolling Parquet shards.

Nothing is half-written: the files are written to a hidden sibling of `--output` and renamed to
it at the end; a failure removes the sibling. `--overwrite` replaces only a directory an earlier
`openkd export` wrote (it holds the `.openkd-export.json` manifest, hidden so that dataset
loaders that infer a format from file names never read it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd.data.jsonl import fsync_dir
from openkd.errors import OpenkdError
from openkd.paths import check_writable

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST = ".openkd-export.json"
META_KEY = "openkd.export"  # Parquet key-value metadata: the provenance, as JSON
IDS_KEY = "openkd.ids"  # Parquet file metadata: the file's row ids, as a JSON list


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


class Staging:
    """A hidden sibling of `output` to write into; `commit()` renames it to `output`."""

    def __init__(self, output: Path, inputs: list[Path], overwrite: bool) -> None:
        self.output = Path(output).expanduser().absolute()
        for given in inputs:
            given = given.expanduser().absolute()
            if _inside(given, self.output) or _inside(self.output, given):
                raise OpenkdError(
                    f"--output {output} would overlap the input {given}; export never writes "
                    "into its input: pass another --output"
                )
        if self.output.exists():
            if not (self.output / MANIFEST).is_file():
                raise OpenkdError(
                    f"--output {output} exists and is not an `openkd export` directory; pass "
                    "another --output (export replaces only what it wrote, with --overwrite)"
                )
            if not overwrite:
                raise OpenkdError(
                    f"--output {output} already holds an export; pass --overwrite to replace "
                    "it, or another --output"
                )
        check_writable(self.output, "--output")
        self.path = self.output.with_name(f".{self.output.name}.openkd-tmp-{os.getpid()}")
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def commit(self, manifest: dict[str, Any]) -> None:
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        for child in self.path.iterdir():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(self.path)
        if self.output.exists():  # checked in __init__: an earlier export, and --overwrite
            old = self.output.with_name(f".{self.output.name}.openkd-old-{os.getpid()}")
            self.output.rename(old)
            self.path.rename(self.output)
            shutil.rmtree(old)
        else:
            self.path.rename(self.output)
        fsync_dir(self.output.parent)

    def discard(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)


class Shards:
    """Parquet files `name.format(i)`, a new one every `rows_per_file` rows, each holding the
    provenance in its key-value metadata, and the ids of its rows (`IDS_KEY`, a JSON list) when
    `write` is given them (for formats without an id column)."""

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        name: str,
        rows_per_file: int,
        provenance: dict[str, Any],
    ) -> None:
        self.directory = directory
        self.schema = schema.with_metadata({META_KEY: json.dumps(provenance)})
        self.name = name
        self.rows_per_file = rows_per_file
        self.files: list[Path] = []
        self._writer: Any = None
        self._rows = 0
        self._ids: list[str] | None = None

    def write(self, table: pa.Table, ids: list[str] | None = None) -> None:
        import pyarrow.parquet as pq

        start = 0
        while start < table.num_rows:
            if self._writer is None:
                path = self.directory / self.name.format(len(self.files))
                self.files.append(path)
                self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
                self._rows = 0
            take = min(table.num_rows - start, self.rows_per_file - self._rows)
            self._writer.write_table(table.slice(start, take))
            if ids is not None:
                self._ids = (self._ids or []) + ids[start : start + take]
            self._rows += take
            start += take
            if self._rows >= self.rows_per_file:
                self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            if self._ids is not None:
                self._writer.add_key_value_metadata({IDS_KEY: json.dumps(self._ids)})
            self._writer.close()
            self._writer = None
            self._ids = None

    def close(self) -> None:
        self._close_file()

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())
