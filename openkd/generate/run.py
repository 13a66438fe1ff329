"""`openkd generate`: label every selected prompt with the teacher, crash-safely and resumably.

Order matters: everything that can be checked without a teacher (flags, teacher path, output
directory, dataset, columns, template, every prompt) is checked first, because engine starts
are expensive. Then the teacher answers batch by batch; each batch is appended and fsynced
before the next starts, so a kill loses at most the batch in flight, and a rerun with the
same arguments skips every id already on disk.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.jsonl import JsonlAppender, write_jsonl_atomic, write_text_atomic
from openkd.data.prompts import PromptBuilder
from openkd.data.schema import FINISH_LENGTH, Message, is_complete, make_record, record_id
from openkd.data.sources import iter_rows, load_source, looks_like_path, selection
from openkd.errors import OpenkdError
from openkd.generate import metadata as md
from openkd.generate.backends.base import Completion, Sampling
from openkd.generate.card import render_card
from openkd.generate.outputs import (
    OutputFiles,
    check_writable,
    exclusive,
    remove_all,
    resolve_output,
)
from openkd.generate.plan import Plan, in_eval_split, make_plan
from openkd.generate.resume import ResumeState, load_state

if TYPE_CHECKING:
    from datasets import Dataset

    from openkd.generate.backends.base import Backend
    from openkd.generate.config import GenerateConfig

# Backends that load --teacher on this machine, where a missing local path is a typo.
LOCAL_TEACHER_BACKENDS = ("vllm", "transformers", "mock")


def sampling_from(cfg: GenerateConfig) -> Sampling:
    return Sampling(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop=tuple(cfg.stop or ()),
        seed=cfg.seed,
    )


def check_teacher(cfg: GenerateConfig) -> None:
    local = cfg.backend in LOCAL_TEACHER_BACKENDS or (cfg.backend == "openai" and cfg.serve)
    if local and looks_like_path(cfg.teacher) and not Path(cfg.teacher).expanduser().exists():
        raise OpenkdError(
            f"--teacher {cfg.teacher} does not exist; pass an existing model directory "
            "or a Hub id such as Qwen/Qwen2.5-0.5B-Instruct"
        )


@dataclass
class RunCounts:
    """What this invocation did (the metadata keeps totals over all runs)."""

    selected: int = 0
    already_done: int = 0
    duplicates: int = 0
    pending: int = 0
    answered: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0
    empty: int = 0
    filtered: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    labelling_seconds: float = 0.0


@dataclass
class Job:
    """Everything the labelling loop needs, resolved and validated."""

    cfg: GenerateConfig
    files: OutputFiles
    sampling: Sampling
    teacher: str
    dataset: Dataset
    builder: PromptBuilder

    def record_id(self, messages: list[Message]) -> str:
        return record_id(messages, self.teacher, self.sampling.as_dict())


def run(cfg: GenerateConfig) -> None:
    started_wall, started_at = time.monotonic(), md.now()
    job = prepare(cfg)
    files = job.files
    with exclusive(files):
        state, previous = _resume(job)
        plan = _plan(job, state)
        # Earlier failures outside this selection (other teacher, fewer --max-samples) are stale.
        state.failed = {k: v for k, v in state.failed.items() if k in plan.watched}
        if cfg.overwrite:  # only now: a bad prompt found while planning must not cost old data
            for path in remove_all(files):
                console.info(f"--overwrite: removed {path}")
        _announce(job, plan, state)
        counts = RunCounts(
            selected=plan.selected,
            already_done=plan.already_done,
            duplicates=plan.duplicates,
            pending=len(plan.pending),
        )
        meta = _initial_meta(job, previous, state, started_at)
        md.write_meta(files.meta, meta)
        failures: dict[str, dict[str, Any]] = {}
        status = "stopped"  # until the labelling loop returns normally
        backend_versions: dict[str, str] = {}
        try:
            if len(plan.pending):
                from openkd.generate.backends import make_backend

                backend = make_backend(cfg)
                with _terminate_as_interrupt(), backend:
                    _label(job, backend, plan, state, counts, failures)
                    backend_versions = backend.versions()
            status = "complete"
        finally:
            failed_rows = _finish_failed(files, state, failures)
            if status == "complete" and failed_rows:
                status = "incomplete"
            run_info = _RunInfo(status, started_at, started_wall, backend_versions)
            _finish_meta(job, meta, state, counts, failed_rows, run_info)
    _summary(job, counts, failed_rows, time.monotonic() - started_wall)
    _warn_if_truncating(job, counts)
    console.stdout_line(str(files.output))
    if counts.failed:
        push_note = "; the Hub push was skipped" if cfg.push_to_hub else ""
        raise OpenkdError(
            f"{counts.failed:,} of {counts.pending:,} prompts failed (reasons in {files.failed})"
            f"{push_note}; rerun the same command to retry them"
        )
    if cfg.push_to_hub:
        _push(job, meta)


def prepare(cfg: GenerateConfig) -> Job:
    """Every check that needs no teacher: flags, teacher path, output, dataset, prompt format."""
    sampling = sampling_from(cfg)
    if not cfg.greedy:
        console.warn(
            f"--temperature {cfg.temperature}: answers are sampled, not greedy; "
            "hard-label distillation normally uses --temperature 0"
        )
    files = resolve_output(cfg.output, cfg.shard_index)
    check_teacher(cfg)
    if cfg.backend == "distilabel" and cfg.llm_class:
        from openkd.generate.backends.distilabel import import_llm_class

        import_llm_class(cfg.llm_class)  # a wrong class fails before the dataset is read
    check_writable(files)
    dataset = _quiet_load(cfg)
    builder = PromptBuilder(
        columns=list(dataset.column_names),
        source=cfg.dataset,
        prompt_column=cfg.prompt_column,
        messages_column=cfg.messages_column,
        template=cfg.prompt_template,
        system_prompt=cfg.system_prompt,
    )
    teacher = md.teacher_key(cfg.teacher, cfg.revision)
    return Job(cfg, files, sampling, teacher, dataset, builder)


def _resume(job: Job) -> tuple[ResumeState, dict[str, Any] | None]:
    """What earlier runs left (nothing with --overwrite), after checking it is compatible."""
    if job.cfg.overwrite:
        return ResumeState(), None
    state = load_state(job.files)
    for path, cut in state.repaired:
        console.warn(f"{path}: cut {cut} bytes of a line torn by an earlier kill")
    previous = md.read_meta(job.files.meta)
    expected = md.fingerprint(job.cfg.teacher, job.cfg.revision, job.sampling.as_dict())
    md.check_compatible(previous, expected, job.files.output, state.has_rows)
    set_aside = state.counts.get("truncated", {}).get("rows", 0)
    if job.cfg.keep_truncated and set_aside:
        console.warn(
            f"{set_aside:,} answers set aside earlier stay in {job.files.truncated.name} "
            "(--keep-truncated applies to new answers; --overwrite relabels everything)"
        )
    return state, (previous if state.has_rows else None)


def _quiet_load(cfg: GenerateConfig) -> Dataset:
    """Load the dataset without `datasets`' own error logging: openkd reports the problem."""
    import logging

    import datasets  # noqa: F401 (configures its logger on import; quiet it after that)

    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return load_source(cfg.dataset, split=cfg.split, subset=cfg.subset)
    finally:
        log.setLevel(level)


def _plan(job: Job, state: ResumeState) -> Plan:
    from openkd.generate.progress import reading

    cfg = job.cfg
    positions = selection(
        len(job.dataset), max_samples=cfg.max_samples, shuffle_seed=cfg.shuffle_seed
    )
    with reading(len(positions)) as advance:
        return make_plan(
            job.dataset,
            job.builder,
            positions,
            key=job.record_id,
            shard=cfg.shard_index,
            done=state.done,
            watch=set(state.failed),
            on_batch=advance,
        )


def _announce(job: Job, plan: Plan, state: ResumeState) -> None:
    where = f" (shard {job.cfg.shard})" if job.cfg.shard else ""
    parts = [f"{plan.selected:,} prompts{where}"]
    if plan.duplicates:
        parts.append(f"{plan.duplicates:,} repeated prompts labelled once")
    if plan.already_done:
        parts.append(f"{plan.already_done:,} already done in {job.files.output.name}, skipped")
    parts.append(f"{len(plan.pending):,} to label with {job.cfg.teacher} ({job.cfg.backend})")
    console.info("; ".join(parts))
    if plan.selected == 0:
        console.warn("no prompts selected; check --max-samples and --shard")
    elif state.has_rows and not plan.already_done:
        console.warn(
            f"none of the {len(state.done):,} rows already in {job.files.output.name} match "
            "this run's prompts (changed --prompt-template, --system-prompt or --dataset?); "
            "new rows are appended to them"
        )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (Slurm preemption, `kill`) stops like Ctrl-C: the teacher is shut down cleanly."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _route(job: Job, record: dict[str, Any], rid: str) -> str:
    if not is_complete(record) and not job.cfg.keep_truncated:
        return "truncated"
    return "eval" if in_eval_split(rid, job.cfg.eval_fraction) else "train"


def _label(
    job: Job,
    backend: Backend,
    plan: Plan,
    state: ResumeState,
    counts: RunCounts,
    failures: dict[str, dict[str, Any]],
) -> None:
    from openkd.generate.progress import labelling

    files = job.files
    paths = {"train": files.output, "eval": files.eval, "truncated": files.truncated}
    writers = {kind: JsonlAppender(path) for kind, path in paths.items()}
    started = time.monotonic()
    try:
        with labelling(len(plan.pending)) as bar:
            for rows in iter_rows(
                job.dataset, plan.pending, job.builder.columns, job.cfg.batch_size
            ):
                batch = [(index, job.builder.build(row, index)) for index, row in rows]
                completions = backend.generate([messages for _, messages in batch], job.sampling)
                if len(completions) != len(batch):
                    raise OpenkdError(
                        f"the {job.cfg.backend} backend returned {len(completions)} answers for "
                        f"{len(batch)} prompts; this is a bug in the backend, please report it"
                    )
                out = _sort_answers(job, batch, completions, state, counts, failures)
                tokens = sum(r["completion_tokens"] for recs in out.values() for r in recs)
                for kind, records in out.items():
                    writers[kind].write_batch(records)
                bar.advance(len(batch), tokens)
    finally:
        counts.labelling_seconds = time.monotonic() - started
        for writer in writers.values():
            writer.close()


def _sort_answers(
    job: Job,
    batch: list[tuple[int, list[Message]]],
    completions: list[Completion],
    state: ResumeState,
    counts: RunCounts,
    failures: dict[str, dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Records per destination file (train, eval, truncated); failures go to `failures`."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "eval": [], "truncated": []}
    for (index, messages), completion in zip(batch, completions, strict=True):
        rid = job.record_id(messages)
        if completion.failed:
            failures[rid] = _failure_row(rid, messages, index, completion)
            counts.failed += 1
            continue
        state.failed.pop(rid, None)
        record = make_record(
            id=rid,
            prompt=messages,
            text=completion.text or "",
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            source_index=index,
        )
        kind = _route(job, record, rid)
        out[kind].append(record)
        _count(counts, state, record, kind)
    return out


def _count(counts: RunCounts, state: ResumeState, record: dict[str, Any], kind: str) -> None:
    counts.answered += 1
    counts.prompt_tokens += record["prompt_tokens"]
    counts.completion_tokens += record["completion_tokens"]
    if record["finish_reason"] == FINISH_LENGTH:
        counts.truncated += 1
    elif not is_complete(record):
        counts.empty += 1
    if kind == "truncated":
        counts.filtered += 1
    else:
        setattr(counts, kind, getattr(counts, kind) + 1)
    tally = state.counts.setdefault(kind, md.tally())
    tally["rows"] += 1
    tally["prompt_tokens"] += record["prompt_tokens"]
    tally["completion_tokens"] += record["completion_tokens"]


def _failure_row(
    rid: str, messages: list[Message], index: int, completion: Completion
) -> dict[str, Any]:
    return {
        "id": rid,
        "prompt": messages,
        "source_index": index,
        "error": completion.error or "the teacher returned no text",
    }


def _finish_failed(
    files: OutputFiles, state: ResumeState, failures: dict[str, dict[str, Any]]
) -> int:
    """Rewrite the failed file in one step: earlier failures not retried yet plus this run's."""
    rows = {**state.failed, **failures}
    if rows:
        write_jsonl_atomic(files.failed, rows.values())
    elif files.failed.exists():
        files.failed.unlink()
    return len(rows)


def _initial_meta(
    job: Job, previous: dict[str, Any] | None, state: ResumeState, started_at: str
) -> dict[str, Any]:
    cfg = job.cfg
    config = md.redact(cfg.to_yaml_dict())
    return {
        "format": md.FORMAT,
        "output": job.files.output.name,
        "status": "running",
        "started_at": (previous or {}).get("started_at") or started_at,
        "finished_at": None,
        "teacher": {
            "name": cfg.teacher,
            "revision": cfg.revision,
            "backend": cfg.backend,
            **({"llm_class": cfg.llm_class} if cfg.backend == "distilabel" else {}),
        },
        "sampling": job.sampling.as_dict(),
        "fingerprint": md.fingerprint(cfg.teacher, cfg.revision, job.sampling.as_dict()),
        "source": {
            key: config[key]
            for key in (
                "dataset",
                "subset",
                "split",
                "prompt_column",
                "messages_column",
                "prompt_template",
                "system_prompt",
                "max_samples",
                "shuffle_seed",
                "shard",
                "eval_fraction",
                "keep_truncated",
            )
        },
        "files": {
            "train": job.files.output.name,
            "eval": job.files.eval.name,
            "truncated": job.files.truncated.name,
            "failed": job.files.failed.name,
            "card": job.files.card.name,
        },
        "versions": md.library_versions({}),
        "counts": {**state.counts, "failed": {"rows": len(state.failed)}},
        "tokens": md.totals(state.counts),
        "runs": list((previous or {}).get("runs", []))[-md.MAX_RUNS + 1 :],
        "config": config,
    }


@dataclass
class _RunInfo:
    """How this invocation ended, for its entry in the metadata's run history."""

    status: str
    started_at: str
    started_wall: float
    backend_versions: dict[str, str]


def _finish_meta(
    job: Job,
    meta: dict[str, Any],
    state: ResumeState,
    counts: RunCounts,
    failed_rows: int,
    info: _RunInfo,
) -> None:
    wall = time.monotonic() - info.started_wall
    busy = counts.labelling_seconds
    run_entry = {
        "started_at": info.started_at,
        "finished_at": md.now(),
        "status": info.status,
        "backend": job.cfg.backend,
        "selected": counts.selected,
        "already_done": counts.already_done,
        "duplicates": counts.duplicates,
        "labelled": counts.answered,
        "failed": counts.failed,
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "wall_seconds": round(wall, 3),
        "labelling_seconds": round(busy, 3),
        "rows_per_second": round(counts.answered / busy, 3) if busy > 0 else None,
        "completion_tokens_per_second": round(counts.completion_tokens / busy, 3)
        if busy > 0
        else None,
    }
    meta.update(
        status=info.status,
        finished_at=md.now(),
        versions=md.library_versions(info.backend_versions),
        counts={**state.counts, "failed": {"rows": failed_rows}},
        tokens=md.totals(state.counts),
        throughput={
            "rows_per_second": run_entry["rows_per_second"],
            "completion_tokens_per_second": run_entry["completion_tokens_per_second"],
        },
    )
    meta["runs"].append(run_entry)
    md.write_meta(job.files.meta, meta)
    write_text_atomic(job.files.card, render_card(meta, name=job.files.stem.name))


def _summary(job: Job, counts: RunCounts, failed_rows: int, wall: float) -> None:
    busy = counts.labelling_seconds
    kept = "kept" if job.cfg.keep_truncated else "set aside"
    rows = [
        ("prompts selected", console.fmt_int(counts.selected)),
        ("already done (skipped)", console.fmt_int(counts.already_done)),
        ("repeated prompts (labelled once)", console.fmt_int(counts.duplicates)),
        ("labelled now", console.fmt_int(counts.answered)),
        ("  -> train rows", console.fmt_int(counts.train)),
    ]
    if job.cfg.eval_fraction:
        rows.append(("  -> eval rows", console.fmt_int(counts.eval)))
    rows += [
        (f"truncated at --max-new-tokens ({kept})", console.fmt_int(counts.truncated)),
        (f"empty answers ({kept})", console.fmt_int(counts.empty)),
        ("failed (retried on rerun)", console.fmt_int(counts.failed)),
        ("prompt tokens", console.fmt_int(counts.prompt_tokens)),
        ("completion tokens", console.fmt_int(counts.completion_tokens)),
        ("wall time", f"{wall:,.1f} s"),
        ("rows/s", console.fmt_rate(counts.answered / busy) if busy > 0 else "-"),
        (
            "completion tokens/s",
            console.fmt_rate(counts.completion_tokens / busy) if busy > 0 else "-",
        ),
    ]
    if failed_rows != counts.failed:
        rows.append(("failed rows on file", console.fmt_int(failed_rows)))
    console.summary_table(f"openkd generate: {job.files.output}", rows)


def _warn_if_truncating(job: Job, counts: RunCounts) -> None:
    """Many answers cut at the limit usually means --max-new-tokens is too small for the task."""
    if counts.answered and counts.truncated / counts.answered > 0.05:
        share = 100 * counts.truncated / counts.answered
        console.warn(
            f"{share:.0f}% of answers hit --max-new-tokens {job.cfg.max_new_tokens}"
            + ("" if job.cfg.keep_truncated else " and were set aside")
            + "; consider a larger --max-new-tokens"
        )


def _push(job: Job, meta: dict[str, Any]) -> None:
    from openkd.generate.hub import push_dataset

    repo = job.cfg.push_to_hub
    assert repo is not None
    if not meta["counts"].get("train", {}).get("rows"):
        raise OpenkdError(f"{job.files.output} has no rows to push; nothing was uploaded")
    console.info(f"pushing {job.files.output} to the Hub dataset {repo} ...")
    card = render_card(meta, name=job.files.stem.name, repo_id=repo)
    push_dataset(job.files, repo, private=job.cfg.private, card=card)
    meta["hub"] = {"repo_id": repo, "private": job.cfg.private, "pushed_at": md.now()}
    md.write_meta(job.files.meta, meta)
    console.info(f"pushed: https://huggingface.co/datasets/{repo}")
