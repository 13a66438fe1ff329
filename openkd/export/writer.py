"""What every format writer shares: buffering rows into bounded batches, counts, skips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from openkd.export.sink import Shards
from openkd.export.source import Provenance, Row
from openkd.export.tokens import Tokens

# A batch is written once it holds this many rows or top-k values (memory stays bounded).
BATCH_ROWS = 512
BATCH_VALUES = 1 << 22


@dataclass
class Options:
    rows_per_file: int
    distillkit_config: Any = None  # codec.CompressionConfig, for distillkit


@dataclass
class Counts:
    rows: int = 0  # rows written
    tokens: int = 0  # completion tokens whose top-k was written
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, row_id: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_skipped.setdefault(reason, row_id)


class FormatWriter:
    """Buffers rows and writes them as Parquet batches through `Shards`."""

    name: ClassVar[str]
    needs_tokenizer: ClassVar[bool] = False
    file_name: ClassVar[str] = "data-{:05d}.parquet"

    def __init__(
        self, directory: Path, provenance: Provenance, tokens: Tokens | None, options: Options
    ) -> None:
        self.directory = directory
        self.provenance = provenance
        self.tokens = tokens
        self.options = options
        self.counts = Counts()
        self.shards = Shards(
            directory, self.schema(), self.file_name, options.rows_per_file, self.metadata()
        )
        self._batch: list[Any] = []
        self._values = 0

    # -- what a format defines ------------------------------------------------------------------

    def schema(self) -> Any:
        raise NotImplementedError

    def prepare(self, row: Row) -> Any | None:
        """The row in this format's terms, or None (after `self.counts.skip`) to leave it out."""
        raise NotImplementedError

    def table(self, batch: list[Any]) -> tuple[Any, list[str] | None]:
        """(pyarrow Table, ids for the file metadata or None) for prepared rows."""
        raise NotImplementedError

    def card(self, manifest: dict[str, Any]) -> str:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {"format": self.name, **self.provenance.to_json()}

    def side_files(self) -> None:
        """Files besides the shards (configs), written before the commit."""

    # -- shared ---------------------------------------------------------------------------------

    def add(self, row: Row) -> None:
        prepared = self.prepare(row)
        if prepared is None:
            return
        self._batch.append(prepared)
        self.counts.rows += 1
        self.counts.tokens += len(row.token_ids)
        self._values += max(1, len(row.token_ids)) * max(1, self.provenance.k)
        if len(self._batch) >= BATCH_ROWS or self._values >= BATCH_VALUES:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            table, ids = self.table(self._batch)
            self.shards.write(table, ids)
        self._batch, self._values = [], 0

    def finish(self) -> None:
        self.flush()
        self.shards.close()
        self.side_files()
