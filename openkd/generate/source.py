"""The prompts still to label, streamed from the dataset in one pass: built once, sent once.

Rows are read a chunk at a time, each prompt is built and given its record id, and only those
of this shard that no earlier run labelled and that did not already occur in this run become
requests. Nothing grows with the dataset but 16 bytes per id (`IdSet`), so a 1M-prompt pass
runs in flat memory. A row that cannot be built becomes a counted, reported problem, not a
crash hours into a run; the first chunk is checked before any teacher starts (`peek`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from openkd.data.prompts import PromptBuilder
from openkd.data.sources import iter_rows
from openkd.errors import OpenkdError
from openkd.generate.backends.base import Request
from openkd.generate.ids import IdSet, RecordIds, to_keys

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    from datasets import Dataset

HASH_SPAN = 16**8
CHUNK = 1024
MAX_REPORTED = 5  # invalid rows quoted in the final error


def in_eval_split(rid: str, fraction: float) -> bool:
    """Deterministic held-out share: the first 8 hex digits of the id, as a fraction."""
    return fraction > 0 and int(rid[:8], 16) / HASH_SPAN < fraction


def in_shard(rid: str, shard: tuple[int, int] | None) -> bool:
    """Shard membership by id hash (digits 8-16, independent of the eval split).

    Hashing, rather than taking every n-th row, puts repeated prompts in the same shard, so
    each is labelled once and merged shards never collide.
    """
    if shard is None:
        return True
    i, n = shard
    return int(rid[8:16], 16) % n == i


@dataclass
class SourceCounts:
    """How the selected rows were decided so far; read live by the progress display."""

    total: int = 0  # answers to give for every selected row (every shard): rows x samples
    scanned: int = 0  # answers to give for the rows read (every shard): rows x samples
    selected: int = 0  # answers of this shard's prompts
    already_done: int = 0
    duplicates: int = 0
    invalid: int = 0
    sent: int = 0
    problems: list[str] = field(default_factory=list)  # the first invalid rows' reasons


class PromptSource:
    """Iterate `Request`s for the rows at `positions` that still need a label."""

    def __init__(
        self,
        dataset: Dataset,
        builder: PromptBuilder,
        positions: np.ndarray | range,
        *,
        ids: RecordIds,
        shard: tuple[int, int] | None,
        done: IdSet,
        samples: int = 1,
        gold_column: str | None = None,
        spill_dir: Path | None = None,
    ) -> None:
        self.samples = samples
        self.total = len(positions) * samples
        self.counts = SourceCounts(total=self.total)
        columns = list(builder.columns)
        if gold_column and gold_column not in columns:
            columns.append(gold_column)
        self._gold = gold_column
        self._rows = iter_rows(dataset, positions, columns, CHUNK)
        self._builder = builder
        self._ids = ids
        self._shard = shard
        self._done = done if len(done) else None
        self._seen = IdSet(spill_dir=spill_dir)  # keeps the process's memory flat
        self._ready: list[Request] = []
        self._first_chunk = True

    def peek(self) -> Request | None:
        """The first request, read before any teacher starts; None when nothing is left to do.

        Invalid rows in the first chunk stop the run here, with nothing sent: a wrong column or
        template shows on the first rows, and a teacher start costs minutes.
        """
        while not self._ready:
            if not self._fill():
                return None
        return self._ready[0]

    def __iter__(self) -> Iterator[Request]:
        while True:
            while self._ready:
                yield from self._take()
            if not self._fill():
                return

    def _take(self) -> list[Request]:
        ready, self._ready = self._ready, []
        self.counts.sent += len(ready)
        return ready

    def _fill(self) -> bool:
        """Read one chunk into the ready list; False at the end of the selection."""
        import numpy as np

        chunk = next(self._rows, None)
        if chunk is None:
            return False
        counts = self.counts
        built = []
        for index, row in chunk:
            try:
                messages = self._builder.build(row, index)
            except OpenkdError as err:
                if self._first_chunk:
                    raise
                counts.invalid += 1
                if len(counts.problems) < MAX_REPORTED:
                    counts.problems.append(str(err))
                continue
            base = self._ids.of(messages)
            if self._shard is not None and not in_shard(base, self._shard):
                continue  # a prompt's samples stay in its shard
            gold = row.get(self._gold) if self._gold else None
            gold = None if gold is None else str(gold)
            if self.samples == 1:
                built.append(Request(base, messages, index, gold=gold))
                continue
            for sample in range(self.samples):
                rid = self._ids.of(messages, sample)
                built.append(Request(rid, messages, index, sample, base, gold))
        self._first_chunk = False
        counts.scanned += len(chunk) * self.samples
        counts.selected += len(built)
        if not built:
            return True
        keys = to_keys([r.id for r in built])
        done = self._done.contains(keys) if self._done is not None else np.zeros(len(keys), bool)
        # A repeat inside the chunk, or of a prompt sent earlier in this run, is labelled once.
        _, first = np.unique(keys, return_index=True)
        repeat = np.ones(len(keys), dtype=bool)
        repeat[first] = False
        repeat |= self._seen.contains(keys)
        fresh = ~done & ~repeat
        self._seen.add(keys[fresh])
        counts.already_done += int(done.sum())
        counts.duplicates += int((repeat & ~done).sum())
        self._ready += [r for r, keep in zip(built, fresh.tolist(), strict=True) if keep]
        return True
