"""Joining the sidecars of sharded generate outputs (`openkd merge`)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openkd.data.jsonl import fsync_dir
from openkd.data.logprobs.format import scan_part, sidecar_dir
from openkd.data.logprobs.reader import SidecarReader
from openkd.errors import OpenkdError


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
        fsync_dir(tmp)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
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
