"""Record ids at millions per minute, and a set of them that costs 16 bytes an id.

`RecordIds.of(messages)` returns exactly `schema.record_id(messages, teacher, sampling)` (ids
on disk stay valid across versions) about three times faster: the teacher and sampling part
of the hashed JSON is built once, and {role, content} messages are serialised by hand.

`IdSet` holds the first 12 bytes of each id (96 bits: among 100M ids, the chance that any two
share them is 1e-13) in sorted numpy arrays (small ones merged like a binary counter, none
larger than `MAX_RUN`, so no merge ever copies the whole set): a 1M-prompt run keeps 12 MB of
ids instead of ~100 MB of Python strings, and membership is checked a chunk of prompts at a time.
Given a `spill_dir`, runs of MAX_RUN/2 keys and more move to an unlinked scratch file there,
memory-mapped: the kernel pages them in as lookups need them and can drop them again, so the
process's own memory stays flat however many prompts the dataset has, and a kill leaves no file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from json.encoder import encode_basestring
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd.data.schema import Message

if TYPE_CHECKING:
    import numpy as np

KEY_BYTES = 16
KEY_DTYPE = "S16"
SET_BYTES = 12  # of each key, held by IdSet
# The JSON record ids hash: sorted keys, UTF-8 text as is, no spaces.
_dumps = functools.partial(json.dumps, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
# Keys per sorted run (1.5 MiB). Full runs are never merged again: memory grows by 12 bytes an
# id with no copies of the whole set, and a lookup costs one binary search per 131k ids.
MAX_RUN = 1 << 17


class RecordIds:
    """Ids of prompts for one teacher and sampling setting."""

    def __init__(self, teacher: str, sampling: dict[str, Any]) -> None:
        # record_id hashes {"prompt": ..., "sampling": ..., "teacher": ...} with sorted keys.
        rest = _dumps({"sampling": sampling, "teacher": teacher})
        self._tail = "," + rest[1:]
        self._teacher = teacher
        self._sampling = sampling

    def of(self, messages: list[Message], sample: int = 0) -> str:
        """The id of `messages`' answer number `sample` (0, the only one unless --num-samples)."""
        # "sample" sorts between "prompt" and "sampling", and is left out for sample 0.
        middle = f',"sample":{sample}' if sample else ""
        return hashlib.sha256(
            ('{"prompt":' + _messages_json(messages) + middle + self._tail).encode("utf-8")
        ).hexdigest()[:32]


def _messages_json(messages: list[Message]) -> str:
    """`json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))`."""
    try:
        if all(len(m) == 2 for m in messages):
            return (
                "["
                + ",".join(
                    [
                        '{"content":' + encode_basestring(m["content"]) + ',"role":'
                        + encode_basestring(m["role"]) + "}"
                        for m in messages
                    ]
                )
                + "]"
            )  # fmt: skip
    except (KeyError, TypeError):  # not {role, content} text messages: the general path
        pass
    return _dumps(messages)


def to_keys(ids: list[str]) -> np.ndarray:
    """32-hex-digit ids as an array of 16-byte keys."""
    import numpy as np

    return np.frombuffer(bytes.fromhex("".join(ids)), dtype=KEY_DTYPE)


class IdSet:
    """A growing set of 16-byte keys in sorted runs; queried and extended in chunks."""

    def __init__(self, keys: np.ndarray | None = None, spill_dir: Path | None = None) -> None:
        import numpy as np

        self._runs: list[np.ndarray] = []
        self._spill_dir = spill_dir
        if keys is not None and len(keys):
            self._runs.append(self._spilled(np.unique(_short(keys))))

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A boolean mask: which of `keys` (16-byte keys) are in the set."""
        import numpy as np

        keys = _short(keys)
        found = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            at = np.searchsorted(run, keys)
            at[at == len(run)] = 0
            found |= run[at] == keys
        return found

    def add(self, keys: np.ndarray) -> None:
        """Add keys not in the set yet (the caller checks with `contains` first)."""
        import numpy as np

        if not len(keys):
            return
        self._runs.append(np.sort(_short(keys)))
        # Small runs merge while sizes stay geometric (each key re-sorted O(log n) times); a
        # merge that would pass MAX_RUN is not made.
        runs = self._runs
        while (
            len(runs) > 1
            and len(runs[-2]) <= 2 * len(runs[-1])
            and len(runs[-2]) + len(runs[-1]) <= MAX_RUN
        ):
            last = runs.pop()
            merged = np.concatenate((runs[-1], last))
            merged.sort(kind="stable")  # in place: two sorted runs merge in one pass
            runs[-1] = merged
        runs[-1] = self._spilled(runs[-1])

    def _spilled(self, run: np.ndarray) -> np.ndarray:
        """`run`, memory-mapped from an unlinked scratch file if it is large and a directory
        was given; as it is when writing fails (a full disk costs memory, not the run)."""
        import numpy as np

        if self._spill_dir is None or len(run) < MAX_RUN // 2 or isinstance(run, np.memmap):
            return run
        with contextlib.suppress(OSError):
            fd, name = tempfile.mkstemp(prefix=".openkd-ids-", dir=self._spill_dir)
            with os.fdopen(fd, "w+b") as fh:
                os.unlink(name)
                fh.write(run.tobytes())
                fh.flush()
                return np.memmap(fh, dtype=run.dtype, mode="r", shape=run.shape)
        return run

    def keys(self) -> np.ndarray:
        """Every key held (their first SET_BYTES bytes), sorted."""
        import numpy as np

        if not self._runs:
            return np.empty(0, dtype=f"S{SET_BYTES}")
        return np.sort(np.concatenate(self._runs)) if len(self._runs) > 1 else self._runs[0]


def _short(keys: np.ndarray) -> np.ndarray:
    """The first SET_BYTES bytes of 16-byte keys, as a compact array."""
    import numpy as np

    if keys.dtype.itemsize == SET_BYTES:
        return keys
    raw = keys.view(np.uint8).reshape(-1, keys.dtype.itemsize)[:, :SET_BYTES]
    return np.ascontiguousarray(raw).view(f"S{SET_BYTES}").ravel()
