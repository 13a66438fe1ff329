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
from typing import Any

from openkd import console
from openkd.data.jsonl import AtomicWriter, dumps, iter_jsonl, write_text_atomic
from openkd.errors import OpenkdError
from openkd.generate import metadata as md
from openkd.generate.card import render_card
from openkd.generate.outputs import OutputFiles, is_sibling, resolve_output

KINDS = ("train", "eval", "truncated", "failed")


def merge_shards(shards: list[Path], output: Path, *, overwrite: bool = False) -> None:
    out = resolve_output(Path(output), None)
    inputs = _inputs(shards, out)
    if out.output.exists() and not overwrite:
        raise OpenkdError(f"{out.output} exists; pass --overwrite to replace it")
    metas = [md.read_meta(files.meta) for files in inputs]
    _check_same_run(inputs, metas)

    owner: dict[str, Path] = {}  # id -> file it came from (labelled rows only)
    failed_ids: set[str] = set()
    counts = {kind: md.tally() for kind in KINDS}
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        for kind in KINDS:
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
                    else:
                        if rid in owner:
                            raise OpenkdError(
                                f"duplicate id {rid} in {owner[rid]} and {source}:{lineno}; "
                                "merge each shard once (shards of one run never share ids)"
                            )
                        owner[rid] = source
                        counts[kind]["prompt_tokens"] += int(row.get("prompt_tokens") or 0)
                        counts[kind]["completion_tokens"] += int(row.get("completion_tokens") or 0)
                    counts[kind]["rows"] += 1
                    fh.write(dumps(row) + "\n")
    for kind in KINDS:  # stale side files of an earlier merge into the same --output
        path = out.kind_path(kind)
        if path not in written and path.exists():
            path.unlink()
    for derived in (out.index, out.ids):  # a resume index of an earlier output: rebuilt on use
        derived.unlink(missing_ok=True)
    counts["failed"] = {"rows": counts["failed"]["rows"]}  # failed prompts have no tokens
    meta = _merged_meta(inputs, metas, out, counts)
    md.write_meta(out.meta, meta)
    write_text_atomic(out.card, render_card(meta, name=out.stem.name))
    _report(inputs, out, counts, metas)


def _inputs(shards: list[Path], out: OutputFiles) -> list[OutputFiles]:
    inputs: list[OutputFiles] = []
    seen: set[Path] = set()
    for shard in shards:
        shard = Path(shard)
        if is_sibling(shard):
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


def _check_same_run(inputs: list[OutputFiles], metas: list[dict[str, Any] | None]) -> None:
    """Shards labelled by different teachers or settings must not be mixed."""
    first: tuple[Path, dict[str, Any]] | None = None
    for files, meta in zip(inputs, metas, strict=True):
        if meta is None:
            continue
        fp = meta.get("fingerprint")
        if first is None:
            first = (files.output, fp)
        elif fp != first[1]:
            raise OpenkdError(
                f"{files.output} and {first[0]} were generated with different teachers or "
                "decoding settings (see their .meta.json); merge shards of one run only"
            )


def _merged_meta(
    inputs: list[OutputFiles],
    metas: list[dict[str, Any] | None],
    out: OutputFiles,
    counts: dict[str, dict[str, int]],
) -> dict[str, Any]:
    known = [m for m in metas if m]
    base = dict(known[0]) if known else {"format": md.FORMAT}
    statuses = {m.get("status") for m in known}
    runs = []
    for files, meta in zip(inputs, metas, strict=True):
        for entry in (meta or {}).get("runs", []):
            runs.append({**entry, "shard_file": files.output.name})
    source = dict(base.get("source") or {})
    source["shard"] = None
    base.update(
        output=out.output.name,
        status="complete"
        if statuses <= {"complete"} and not counts["failed"]["rows"]
        else "incomplete",
        started_at=min((m["started_at"] for m in known if m.get("started_at")), default=md.now()),
        finished_at=max(
            (m["finished_at"] for m in known if m.get("finished_at")), default=md.now()
        ),
        source=source,
        files={
            "train": out.output.name,
            "eval": out.eval.name,
            "truncated": out.truncated.name,
            "failed": out.failed.name,
            "card": out.card.name,
        },
        counts=counts,
        tokens=md.totals(counts),
        runs=runs[-md.MAX_RUNS :],
        merged_from=[
            {"file": f.output.name, "shard": (m or {}).get("source", {}).get("shard")}
            for f, m in zip(inputs, metas, strict=True)
        ],
        merged_at=md.now(),
    )
    if isinstance(base.get("config"), dict):
        base["config"] = {**base["config"], "shard": None, "output": str(out.output)}
    base.pop("throughput", None)
    base.pop("hub", None)
    return base


def _report(
    inputs: list[OutputFiles],
    out: OutputFiles,
    counts: dict[str, dict[str, int]],
    metas: list[dict[str, Any] | None],
) -> None:
    shards = [(m or {}).get("source", {}).get("shard") for m in metas]
    declared = {s.split("/")[1] for s in shards if s}
    if len(declared) == 1:
        n = int(declared.pop())
        missing = sorted(set(range(n)) - {int(s.split("/")[0]) for s in shards if s})
        if missing:
            console.warn(
                f"merged {len(inputs)} of {n} shards; missing "
                + ", ".join(f"{i}/{n}" for i in missing)
            )
    if counts["failed"]["rows"]:
        console.warn(
            f"{counts['failed']['rows']:,} prompts failed in the shards ({out.failed}); "
            "rerun their shards, then merge again"
        )
    console.summary_table(
        f"openkd merge: {out.output}",
        [
            ("shards", console.fmt_int(len(inputs))),
            ("train rows", console.fmt_int(counts["train"]["rows"])),
            ("eval rows", console.fmt_int(counts["eval"]["rows"])),
            ("truncated rows (set aside)", console.fmt_int(counts["truncated"]["rows"])),
            ("failed prompts", console.fmt_int(counts["failed"]["rows"])),
            ("prompt tokens", console.fmt_int(md.totals(counts)["prompt_tokens"])),
            ("completion tokens", console.fmt_int(md.totals(counts)["completion_tokens"])),
        ],
    )
    console.stdout_line(str(out.output))
