"""Decide, before any teacher starts, which rows to label: one pass over the selected prompts.

The pass builds every prompt (so a bad row is reported before an expensive engine start),
computes its record id, keeps this shard's share, and drops ids already labelled and repeated
prompts. It keeps only the positions still to do (8 bytes each), never the prompts.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from openkd.data.prompts import PromptBuilder
from openkd.data.schema import Message
from openkd.data.sources import iter_rows

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset

HASH_SPAN = 16**8


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
class Plan:
    selected: int
    already_done: int
    duplicates: int
    pending: np.ndarray
    watched: set[str]  # the ids of `watch` that are in this selection


def make_plan(
    dataset: Dataset,
    builder: PromptBuilder,
    positions: np.ndarray | range,
    *,
    key: Callable[[list[Message]], str],
    shard: tuple[int, int] | None,
    done: set[str],
    watch: set[str] | frozenset[str] = frozenset(),
    batch_size: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> Plan:
    import numpy as np

    pending = array("q")
    seen: set[str] = set()
    watched: set[str] = set()
    selected = already_done = duplicates = 0
    for rows in iter_rows(dataset, positions, builder.columns, batch_size):
        for index, row in rows:
            rid = key(builder.build(row, index))
            if not in_shard(rid, shard):
                continue
            selected += 1
            if rid in done:
                already_done += 1
            elif rid in seen:
                duplicates += 1
            else:
                seen.add(rid)
                pending.append(index)
                if rid in watch:
                    watched.add(rid)
        if on_batch is not None:
            on_batch(len(rows))
    return Plan(selected, already_done, duplicates, np.frombuffer(pending, dtype=np.int64), watched)
