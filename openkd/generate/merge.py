"""`openkd merge`: join the outputs of `openkd generate --shard i/n` into one dataset.

Everything is checked before a byte is written: the inputs exist and are none of the output's
files, the shards come from one `--shard i/N` run (one N, each i once, one teacher and decoding),
and every shard of the run is there and finished (its metadata says complete, no failed prompts
pending). A shard that is missing or unfinished stops the merge with one line naming it, unless
`--allow-incomplete`: then the merged output is written and marked incomplete, with which shards.

Every id must be unique across all shards and all their files (labelled, eval, truncated);
the first duplicate stops the merge with the id and both files named. All merged files are
written under temporary names and renamed only when everything succeeded. Side files of each
shard (eval, truncated, failed) are merged into the matching side files of the output, and
the shards' metadata into one, so the merged output can even be resumed by an unsharded
`openkd generate` run (it would label only the prompts the shards did not).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from openkd import console
from openkd.data.jsonl import AtomicWriter, dumps, iter_jsonl
from openkd.data.layout import KIND_SUFFIX, OutputFiles, is_side_file, resolve_output
from openkd.data.logprobs import merge_beside
from openkd.data.metadata import Counts, GenerateMeta, MergedShard
from openkd.data.schema import LabelledRow
from openkd.errors import OpenkdError
from openkd.generate.card import write_card
from openkd.paths import check_writable

SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)\.jsonl$")
# How a shard's metadata status reads in the message (others: "is <status>").
UNFINISHED = {
    "running": "did not finish (status running: killed, or still at work)",
    "stopped": "was stopped before it finished",
}


@dataclass(frozen=True)
class Shard:
    """One input: its files, its metadata and which shard of how many it is (if known)."""

    files: OutputFiles
    meta: GenerateMeta | None
    position: tuple[int, int] | None

    @property
    def label(self) -> str:
        if self.position is None:
            return str(self.files.output)
        i, n = self.position
        return f"shard {i}/{n} ({self.files.output})"


def merge_shards(
    shards: list[Path], output: Path, *, overwrite: bool = False, allow_incomplete: bool = False
) -> None:
    out = resolve_output(Path(output), None)
    check_writable(out.output, "--output")
    inputs = _inputs(shards, out)
    _check_not_input(out, inputs, shards)
    previous = _previous_output(out, overwrite)
    metas = [GenerateMeta.read(f.meta) for f in inputs]
    found = [Shard(f, m, _position(f, m)) for f, m in zip(inputs, metas, strict=True)]
    _check_one_run(found)
    gaps, missing = _gaps(found)
    if gaps and not allow_incomplete:
        raise OpenkdError(
            f"not merging: {'; '.join(gaps)}; rerun those shards (the same `openkd generate "
            "--shard i/n` command continues where it stopped), then merge again, or pass "
            "--allow-incomplete to merge what is there (marked incomplete)"
        )
    if gaps:
        console.warn(
            f"--allow-incomplete: {'; '.join(gaps)}; the merged output is marked incomplete"
        )
    if previous:
        console.info(f"--overwrite: replacing {', '.join(str(p) for p in previous)}")

    counts, written, soft = _write_rows(inputs, out)
    rewritten = (*written, out.meta, out.card)
    for path in (*out.all(), out.logprobs):  # the previous output's files this one lacks
        if path in rewritten or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    files = {kind: out.kind_path(kind).name for kind in KIND_SUFFIX} | {"card": out.card.name}
    shard_metas = [(s.files.output.name, s.meta) for s in found]
    meta = GenerateMeta.merge(shard_metas, output=out.output.name, files=files, counts=counts)
    meta.merged_from = [_entry(s) for s in found] + missing
    if gaps:
        meta.status = "incomplete"
    if soft is not None and meta.logprobs is not None:
        meta.logprobs.update({"bytes": soft.bytes, "bytes_per_token": None})
    meta.write(out.meta)
    write_card(out, meta)
    _report(found, out, counts, meta.status)


# --- checks, all before anything is written -----------------------------------------------


def _inputs(shards: list[Path], out: OutputFiles) -> list[OutputFiles]:
    inputs: list[OutputFiles] = []
    seen: set[Path] = set()
    for shard in shards:
        shard = Path(shard)
        if is_side_file(shard):
            console.info(f"skipping {shard}: side files are merged with their shard")
            continue
        if not shard.is_file():
            raise OpenkdError(f"shard {shard} does not exist; pass the shard JSONL files")
        resolved = shard.resolve()
        if resolved == out.output.resolve():
            raise OpenkdError(f"--output {out.output} is also an input shard; pick another name")
        if resolved in seen:
            raise OpenkdError(f"shard {shard} is given twice; pass each shard once")
        seen.add(resolved)
        inputs.append(OutputFiles(shard))
    if not inputs:
        raise OpenkdError("no shard files to merge; pass the files `openkd generate --shard` wrote")
    return inputs


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _check_not_input(out: OutputFiles, inputs: list[OutputFiles], given: list[Path]) -> None:
    """No file the merge writes (or removes) may be one of the shards' files."""
    theirs: dict[str, Path] = {_real(Path(p)): Path(p) for p in given}
    for files in inputs:
        for path in (files.output, *files.all(), files.logprobs):
            theirs.setdefault(_real(path), files.output)
    for path in (out.output, *out.all(), out.logprobs):
        owner = theirs.get(_real(path))
        if owner is not None:
            whose = "is an input" if _real(owner) == _real(path) else f"belongs to input {owner}"
            raise OpenkdError(
                f"--output {out.output} would write {path}, which {whose}; merge into another "
                "--output (an input is never written)"
            )


def _previous_output(out: OutputFiles, overwrite: bool) -> list[Path]:
    """The files of an earlier output at --output: refused without --overwrite, and replaced
    with it only if openkd wrote them (its metadata beside them says so)."""
    existing = [p for p in (*out.all(), out.logprobs) if p.exists()]
    if not existing:
        return []
    if not overwrite:
        raise OpenkdError(f"{existing[0]} exists; pass --overwrite to replace it")
    if not out.meta.is_file():
        raise OpenkdError(
            f"{existing[0]} exists but is not an openkd output (no {out.meta.name} beside it); "
            "--overwrite replaces only what openkd wrote: move it away or pass another --output"
        )
    return existing


def _position(files: OutputFiles, meta: GenerateMeta | None) -> tuple[int, int] | None:
    """Which shard of how many: from the file name `<stem>.shard-i-of-n.jsonl`, else the
    metadata's --shard."""
    found = SHARD_NAME.search(files.output.name)
    if found:
        return int(found.group(1)), int(found.group(2))
    spec = meta.source.get("shard") if meta else None
    if isinstance(spec, str) and re.fullmatch(r"\d+/\d+", spec):
        i, n = spec.split("/")
        return int(i), int(n)
    return None


def _check_one_run(found: list[Shard]) -> None:
    """One --shard count, each shard once, one teacher and decoding."""
    placed = [s for s in found if s.position is not None]
    counts = {s.position[1] for s in placed if s.position}
    if len(counts) > 1:
        shown = ", ".join(
            f"{s.files.output} is {s.position[0]}/{s.position[1]}" for s in placed if s.position
        )
        raise OpenkdError(
            f"the shards come from different --shard counts ({shown}); merge the shards of one "
            "`--shard i/N` run, all with the same N"
        )
    owner: dict[tuple[int, int], Shard] = {}
    for shard in placed:
        assert shard.position is not None
        if shard.position in owner:
            i, n = shard.position
            raise OpenkdError(
                f"{owner[shard.position].files.output} and {shard.files.output} are both shard "
                f"{i}/{n}; pass each shard once"
            )
        owner[shard.position] = shard
    first: Shard | None = None
    for shard in found:
        if shard.meta is None:
            continue
        if first is None:
            first = shard
        elif first.meta is not None and shard.meta.label_settings != first.meta.label_settings:
            raise OpenkdError(
                f"{shard.files.output} and {first.files.output} were generated with different "
                "teachers or decoding settings (see their .meta.json); merge shards of one run only"
            )


def _gaps(found: list[Shard]) -> tuple[list[str], list[MergedShard]]:
    """What keeps the merged output from being complete, one phrase each, and the metadata
    entries of the missing shards."""
    gaps: list[str] = []
    for shard in found:
        failed = _rows(shard.files.failed)
        if shard.meta is None:
            gaps.append(
                f"{shard.label} has no {shard.files.meta.name}, so it may not have finished"
            )
        elif shard.meta.status != "complete":
            pending = f", {failed:,} failed prompts pending" if failed else ""
            state = UNFINISHED.get(shard.meta.status, f"is {shard.meta.status}")
            gaps.append(f"{shard.label} {state}{pending}")
        elif failed:
            gaps.append(f"{shard.label} has {failed:,} failed prompts pending")
    missing: list[MergedShard] = []
    placed = [s for s in found if s.position is not None]
    if placed:
        assert placed[0].position is not None
        n = placed[0].position[1]
        have = {s.position[0] for s in placed if s.position}
        template = placed[0].files.output
        for i in sorted(set(range(n)) - have):
            name = SHARD_NAME.sub(f".shard-{i}-of-{n}.jsonl", template.name)
            if name == template.name:  # the name did not say which shard it is
                name = f"shard {i}/{n}"
            gaps.append(f"shard {i}/{n} is missing (no {template.with_name(name)})")
            missing.append({"file": name, "shard": f"{i}/{n}", "status": "missing"})
    return gaps, missing


def _rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _entry(shard: Shard) -> MergedShard:
    position = f"{shard.position[0]}/{shard.position[1]}" if shard.position else None
    status = shard.meta.status if shard.meta else "no metadata"
    return {"file": shard.files.output.name, "shard": position, "status": status}


# --- writing ------------------------------------------------------------------------------


def _write_rows(inputs: list[OutputFiles], out: OutputFiles) -> tuple[Counts, list[Path], Any]:
    """Every row file of the output, and its log-probability sidecar, from the shards'; nothing
    is renamed into place unless all of it succeeded."""
    owner: dict[str, Path] = {}  # id -> file it came from (labelled rows only)
    failed_ids: set[str] = set()
    counts = Counts()
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        for kind in KIND_SUFFIX:
            sources = [files.kind_path(kind) for files in inputs if files.kind_path(kind).is_file()]
            if not sources and kind != "train":
                continue
            fh = stack.enter_context(AtomicWriter(out.kind_path(kind)))
            written.append(out.kind_path(kind))
            for source in sources:
                for lineno, row in iter_jsonl(source):
                    rid = row.get("id")
                    if not isinstance(rid, str):
                        raise OpenkdError(
                            f"{source}:{lineno}: row has no 'id'; not an openkd output"
                        )
                    if kind == "failed":
                        if rid in failed_ids or rid in owner:
                            continue
                        failed_ids.add(rid)
                        counts.failed += 1
                    else:
                        if rid in owner:
                            raise OpenkdError(
                                f"duplicate id {rid} in {owner[rid]} and {source}:{lineno}; "
                                "merge each shard once (shards of one run never share ids)"
                            )
                        owner[rid] = source
                        counts.of(kind).add(cast(LabelledRow, row))
                    fh.write(dumps(row) + "\n")
        # Last, so that a shard without the others' sidecar leaves every row file as it was.
        soft = merge_beside([f.output for f in inputs], out.output)
    if soft is not None:
        written.append(out.logprobs)
    return counts, written, soft


def _report(found: list[Shard], out: OutputFiles, counts: Counts, status: str) -> None:
    console.summary_table(
        f"openkd merge: {out.output}",
        [
            ("shards", console.fmt_int(len(found))),
            ("status", status),
            ("train rows", console.fmt_int(counts.train.rows)),
            ("eval rows", console.fmt_int(counts.eval.rows)),
            ("truncated rows (set aside)", console.fmt_int(counts.truncated.rows)),
            ("failed prompts", console.fmt_int(counts.failed)),
            ("prompt tokens", console.fmt_int(counts.kept.prompt_tokens)),
            ("completion tokens", console.fmt_int(counts.kept.completion_tokens)),
        ],
    )
    console.stdout_line(str(out.output))
