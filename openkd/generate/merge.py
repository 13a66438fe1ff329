"""`openkd merge`: join the outputs of `openkd generate --shard i/n` into one dataset.

Every id must be unique across all shards and all their files (labelled, eval, truncated);
the first duplicate stops the merge with the id and both files named. All merged files are
written under temporary names and renamed only when everything succeeded. Side files of each
shard (eval, truncated, failed) are merged into the matching side files of the output, and
the shards' metadata into one, so the merged output can even be resumed by an unsharded
`openkd generate` run (it would label only prompts the shards failed on).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from openkd import console
from openkd.data.jsonl import AtomicWriter, dumps, iter_jsonl
from openkd.data.layout import KIND_SUFFIX, OutputFiles, is_side_file, resolve_output
from openkd.data.logprobs import merge_beside
from openkd.data.metadata import Counts, GenerateMeta
from openkd.errors import OpenkdError
from openkd.generate.card import write_card


def merge_shards(shards: list[Path], output: Path, *, overwrite: bool = False) -> None:
    out = resolve_output(Path(output), None)
    inputs = _inputs(shards, out)
    if out.output.exists() and not overwrite:
        raise OpenkdError(f"{out.output} exists; pass --overwrite to replace it")
    metas = [GenerateMeta.read(files.meta) for files in inputs]
    _check_same_run(inputs, metas)

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
                        counts.of(kind).add(row)
                    fh.write(dumps(row) + "\n")
    for kind in KIND_SUFFIX:  # stale side files of an earlier merge into the same --output
        path = out.kind_path(kind)
        if path not in written and path.exists():
            path.unlink()
    for derived in (out.index, out.ids):  # a resume index of an earlier output: rebuilt on use
        derived.unlink(missing_ok=True)
    files = {kind: out.kind_path(kind).name for kind in KIND_SUFFIX} | {"card": out.card.name}
    shard_metas = [(f.output.name, m) for f, m in zip(inputs, metas, strict=True)]
    meta = GenerateMeta.merge(shard_metas, output=out.output.name, files=files, counts=counts)
    soft = merge_beside([f.output for f in inputs], out.output)
    if soft is not None and meta.logprobs is not None:
        meta.logprobs.update(bytes=soft.bytes, bytes_per_token=None)
    meta.write(out.meta)
    write_card(out, meta)
    _report(inputs, out, counts, metas)


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


def _check_same_run(inputs: list[OutputFiles], metas: list[GenerateMeta | None]) -> None:
    """Shards labelled by different teachers or settings must not be mixed."""
    first: tuple[Path, dict] | None = None
    for files, meta in zip(inputs, metas, strict=True):
        if meta is None:
            continue
        if first is None:
            first = (files.output, meta.fingerprint)
        elif meta.fingerprint != first[1]:
            raise OpenkdError(
                f"{files.output} and {first[0]} were generated with different teachers or "
                "decoding settings (see their .meta.json); merge shards of one run only"
            )


def _report(
    inputs: list[OutputFiles], out: OutputFiles, counts: Counts, metas: list[GenerateMeta | None]
) -> None:
    shards = [meta.source.get("shard") if meta else None for meta in metas]
    declared = {s.split("/")[1] for s in shards if s}
    if len(declared) == 1:
        n = int(declared.pop())
        missing = sorted(set(range(n)) - {int(s.split("/")[0]) for s in shards if s})
        if missing:
            console.warn(
                f"merged {len(inputs)} of {n} shards; missing "
                + ", ".join(f"{i}/{n}" for i in missing)
            )
    if counts.failed:
        console.warn(
            f"{counts.failed:,} prompts failed in the shards ({out.failed}); "
            "rerun their shards, then merge again"
        )
    console.summary_table(
        f"openkd merge: {out.output}",
        [
            ("shards", console.fmt_int(len(inputs))),
            ("train rows", console.fmt_int(counts.train.rows)),
            ("eval rows", console.fmt_int(counts.eval.rows)),
            ("truncated rows (set aside)", console.fmt_int(counts.truncated.rows)),
            ("failed prompts", console.fmt_int(counts.failed)),
            ("prompt tokens", console.fmt_int(counts.kept.prompt_tokens)),
            ("completion tokens", console.fmt_int(counts.kept.completion_tokens)),
        ],
    )
    console.stdout_line(str(out.output))
