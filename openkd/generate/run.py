"""`openkd generate`: label every selected prompt with the teacher, crash-safely and resumably.

Order matters: everything that can be checked without a teacher (flags, teacher path, output
directory, dataset, columns, template, the first prompts) is checked first, because engine
starts are expensive. Then prompts stream from the dataset into the teacher, which is kept
full, and each answer is written as it lands (`label.py`); commits every `--commit-interval`
seconds bound what a kill can lose, and a rerun with the same arguments skips every id
already on disk.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.jsonl import write_jsonl_atomic, write_text_atomic
from openkd.data.prompts import PromptBuilder
from openkd.data.sources import load_source, looks_like_path, selection, source_stamp
from openkd.errors import OpenkdError
from openkd.generate import metadata as md
from openkd.generate.backends.base import Sampling
from openkd.generate.card import render_card
from openkd.generate.ids import IdSet, RecordIds
from openkd.generate.label import LabelCounts, Routing, label
from openkd.generate.outputs import (
    OutputFiles,
    check_writable,
    exclusive,
    remove_all,
    resolve_output,
)
from openkd.generate.resume import (
    Index,
    ResumeState,
    empty_state,
    finished_selection,
    load_state,
    selection_key,
)
from openkd.generate.source import PromptSource, SourceCounts
from openkd.generate.writer import OutputWriter

if TYPE_CHECKING:
    from datasets import Dataset

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
class Job:
    """What the run writes and how it asks the teacher, resolved and validated."""

    cfg: GenerateConfig
    files: OutputFiles
    sampling: Sampling
    teacher: str
    stamp: str | None  # the local dataset files' fingerprint (None for a Hub dataset)

    @property
    def selection(self) -> str | None:
        if self.stamp is None:
            return None
        return selection_key(self.cfg, self.stamp, self.sampling.as_dict())


@dataclass
class Prompts:
    """The dataset, and how a row becomes a conversation; both checked against each other."""

    dataset: Dataset
    builder: PromptBuilder


@dataclass
class Outcome:
    """How this invocation ended, for the metadata, the summary and the exit status."""

    status: str  # complete, incomplete (failed or invalid prompts), stopped
    started_at: str
    started_wall: float
    backend_versions: dict[str, str]
    failed_rows: int = 0  # failures on file after this run (earlier ones included)


def run(cfg: GenerateConfig) -> None:
    started_wall, started_at = time.monotonic(), md.now()
    job = prepare(cfg)
    files = job.files
    if not cfg.overwrite and _already_complete(job, started_at, started_wall):
        return
    prompts = load_prompts(cfg)
    found = LabelCounts()
    with exclusive(files):
        state, previous = _resume(job)
        source = _source(job, prompts, state)
        first = source.peek()  # the first rows are built (and checked) before any teacher
        backend = None
        if first is not None:
            from openkd.generate.backends import make_backend

            backend = make_backend(cfg)  # checks its settings; loads nothing yet
        if cfg.overwrite:  # only now: a bad prompt found by peek must not cost old data
            for path in remove_all(files):
                console.info(f"--overwrite: removed {path}")
        _announce(job, source, state)
        meta = _initial_meta(job, previous, state, started_at)
        md.write_meta(files.meta, meta)
        writer = OutputWriter(files, state.index, cfg.commit_interval)
        outcome = Outcome("stopped", started_at, started_wall, {})
        try:
            if backend is not None:
                with _terminate_as_interrupt(), backend:
                    console.info(f"keeping {backend.in_flight():,} requests in flight")
                    label(backend, source, job.sampling, writer, _routing(cfg, state), found)
                    outcome.backend_versions = backend.versions()
            outcome.status = "complete"
        finally:
            _finish(job, state, source, writer, found, meta, outcome)
        if outcome.status == "complete" and job.selection:
            _record_selection(job, state, source.counts)
    _summary(job, source.counts, found, outcome)
    _warn_if_truncating(job, found)
    console.stdout_line(str(files.output))
    _raise_if_incomplete(job, source.counts, found)
    if cfg.push_to_hub:
        _push(job, meta)


def prepare(cfg: GenerateConfig) -> Job:
    """The checks that need neither teacher nor dataset: flags, teacher path, output."""
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
    teacher = md.teacher_key(cfg.teacher, cfg.revision)
    return Job(cfg, files, sampling, teacher, source_stamp(cfg.dataset))


def load_prompts(cfg: GenerateConfig) -> Prompts:
    """The dataset, with its columns checked against the prompt options."""
    dataset = _quiet_load(cfg)
    builder = PromptBuilder(
        columns=list(dataset.column_names),
        source=cfg.dataset,
        prompt_column=cfg.prompt_column,
        messages_column=cfg.messages_column,
        template=cfg.prompt_template,
        system_prompt=cfg.system_prompt,
    )
    return Prompts(dataset, builder)


def _resume(job: Job) -> tuple[ResumeState, dict[str, Any] | None]:
    """What earlier runs left (nothing with --overwrite), after checking it is compatible."""
    if job.cfg.overwrite:
        return empty_state(), None
    previous = md.read_meta(job.files.meta)
    expected = md.fingerprint(job.cfg.teacher, job.cfg.revision, job.sampling.as_dict())
    has_rows = any(p.is_file() and p.stat().st_size for p in job.files.row_files)
    md.check_compatible(previous, expected, job.files.output, has_rows)
    state = load_state(job.files)
    for path, cut in state.repaired:
        console.warn(
            f"{path}: cut {cut} bytes of a torn last line (an earlier run was killed or ran "
            "out of disk)"
        )
    set_aside = state.counts["truncated"].rows
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


def _source(job: Job, prompts: Prompts, state: ResumeState) -> PromptSource:
    cfg = job.cfg
    positions = selection(
        len(prompts.dataset), max_samples=cfg.max_samples, shuffle_seed=cfg.shuffle_seed
    )
    return PromptSource(
        prompts.dataset,
        prompts.builder,
        positions,
        ids=RecordIds(job.teacher, job.sampling.as_dict()),
        shard=cfg.shard_index,
        done=state.done,
    )


def _routing(cfg: GenerateConfig, state: ResumeState) -> Routing:
    return Routing(
        eval_fraction=cfg.eval_fraction,
        keep_truncated=cfg.keep_truncated,
        earlier_failures=frozenset(state.failed),
    )


def _announce(job: Job, source: PromptSource, state: ResumeState) -> None:
    where = f" (shard {job.cfg.shard})" if job.cfg.shard else ""
    parts = [f"{source.total:,} prompts selected{where}"]
    if state.has_rows:
        parts.append(f"{len(state.done):,} rows already in {job.files.output.name} are skipped")
    if state.failed:
        parts.append(f"{len(state.failed):,} earlier failures are retried")
    console.info("; ".join(parts))
    if source.total == 0:
        console.warn("no prompts selected; check --max-samples")
    elif source.peek() is None:
        console.info(f"nothing to label: every selected prompt is in {job.files.output.name}")
    else:
        console.info(f"teacher: {job.cfg.teacher} ({job.cfg.backend} backend)")


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


def _already_complete(job: Job, started_at: str, started_wall: float) -> bool:
    """A rerun of a finished run (same dataset files and settings, output untouched since) is
    answered from the index alone, without reading the dataset."""
    if not job.selection or not finished_selection(job.files, job.selection):
        return False
    with exclusive(job.files):
        done = finished_selection(job.files, job.selection)
        if done is None:  # changed while we waited for the lock: do the real thing
            return False
        index = Index.read(job.files.index) or Index()
        previous = md.read_meta(job.files.meta)
        expected = md.fingerprint(job.cfg.teacher, job.cfg.revision, job.sampling.as_dict())
        md.check_compatible(previous, expected, job.files.output, True)
        seen = SourceCounts(
            selected=done["selected"],
            already_done=done["selected"] - done["duplicates"],
            duplicates=done["duplicates"],
        )
        console.info(
            f"nothing to label: the {seen.selected:,} prompts selected from {job.cfg.dataset} "
            f"were all labelled by an earlier run into {job.files.output.name} (dataset files "
            "and settings unchanged; --overwrite relabels)"
        )
        state = ResumeState(done=IdSet(), index=index)
        meta = _initial_meta(job, previous, state, started_at)
        outcome = Outcome("complete", started_at, started_wall, {})
        _finish_meta(job, meta, state, seen, LabelCounts(), outcome)
    _summary(job, seen, LabelCounts(), outcome)
    console.stdout_line(str(job.files.output))
    if job.cfg.push_to_hub:
        _push(job, meta)
    return True


def _record_selection(job: Job, state: ResumeState, seen: SourceCounts) -> None:
    """After a complete pass with nothing failed or invalid, a rerun need not read the dataset."""
    if seen.invalid or (job.files.failed.exists() and job.files.failed.stat().st_size):
        return
    state.index.selection = {
        "key": job.selection,
        "selected": seen.selected,
        "duplicates": seen.duplicates,
    }
    state.index.write(job.files.index)


# --- the end of a run: whatever happened, commit, record and summarise -----------------------


def _finish(
    job: Job,
    state: ResumeState,
    source: PromptSource,
    writer: OutputWriter,
    found: LabelCounts,
    meta: dict[str, Any],
    outcome: Outcome,
) -> None:
    """Commit what finished, compact the failures file, finish the metadata and card.

    Runs on every exit; when the run is already failing (a write error, Ctrl-C), a second
    error here is reported as a warning so the first one stays the message the user sees.
    """
    failing = outcome.status != "complete"
    try:
        writer.commit()
        writer.close()
        outcome.failed_rows = _finish_failed(job.files, state, found, outcome.status)
        if outcome.status == "complete" and (outcome.failed_rows or source.counts.invalid):
            outcome.status = "incomplete"
        _finish_meta(job, meta, state, source.counts, found, outcome)
    except OpenkdError as err:
        if not failing:
            raise
        console.warn(f"could not finish the output files: {err}")
    except OSError as err:
        if not failing:
            raise
        console.warn(f"could not finish the output files: {err}")
    finally:
        writer.close()
        if failing:
            _summary(job, source.counts, found, outcome)


def _finish_failed(files: OutputFiles, state: ResumeState, found: LabelCounts, status: str) -> int:
    """Rewrite the failures file in one step: this run's failures, and earlier ones still
    unanswered (after a complete pass, earlier ones it did not meet are stale and dropped)."""
    rows = {} if status == "complete" else dict(state.failed)
    for rid in found.recovered:
        rows.pop(rid, None)
    rows.update(found.failures)
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
    counts = _counts(state, len(state.failed))
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
        "counts": counts,
        "tokens": md.totals(counts),
        "runs": list((previous or {}).get("runs", []))[-md.MAX_RUNS + 1 :],
        "config": config,
    }


def _counts(state: ResumeState, failed_rows: int) -> dict[str, dict[str, int]]:
    return {
        **{kind: asdict(tally) for kind, tally in state.counts.items()},
        "failed": {"rows": failed_rows},
    }


def _finish_meta(
    job: Job,
    meta: dict[str, Any],
    state: ResumeState,
    seen: SourceCounts,
    found: LabelCounts,
    outcome: Outcome,
) -> None:
    wall = time.monotonic() - outcome.started_wall
    busy = found.seconds
    rows_rate = round(found.answered / busy, 3) if busy > 0 else None
    tokens_rate = round(found.completion_tokens / busy, 3) if busy > 0 else None
    run_entry = {
        "started_at": outcome.started_at,
        "finished_at": md.now(),
        "status": outcome.status,
        "backend": job.cfg.backend,
        "selected": seen.selected,
        "already_done": seen.already_done,
        "duplicates": seen.duplicates,
        "invalid": seen.invalid,
        "labelled": found.answered,
        "failed": found.failed,
        "prompt_tokens": found.prompt_tokens,
        "completion_tokens": found.completion_tokens,
        "wall_seconds": round(wall, 3),
        "labelling_seconds": round(busy, 3),
        "rows_per_second": rows_rate,
        "completion_tokens_per_second": tokens_rate,
    }
    counts = _counts(state, outcome.failed_rows)
    meta.update(
        status=outcome.status,
        finished_at=md.now(),
        versions=md.library_versions(outcome.backend_versions),
        counts=counts,
        tokens=md.totals(counts),
        throughput={
            "rows_per_second": rows_rate,
            "completion_tokens_per_second": tokens_rate,
        },
    )
    meta["runs"].append(run_entry)
    md.write_meta(job.files.meta, meta)
    write_text_atomic(job.files.card, render_card(meta, name=job.files.stem.name))


def _summary(job: Job, seen: SourceCounts, found: LabelCounts, outcome: Outcome) -> None:
    busy = found.seconds
    kept = "kept" if job.cfg.keep_truncated else "set aside"
    wall = time.monotonic() - outcome.started_wall
    rows = [
        ("prompts selected", console.fmt_int(seen.selected)),
        ("already done (skipped)", console.fmt_int(seen.already_done)),
        ("repeated prompts (labelled once)", console.fmt_int(seen.duplicates)),
        ("labelled now", console.fmt_int(found.answered)),
        ("  -> train rows", console.fmt_int(found.train)),
    ]
    if job.cfg.eval_fraction:
        rows.append(("  -> eval rows", console.fmt_int(found.eval)))
    rows += [
        (f"truncated at --max-new-tokens ({kept})", console.fmt_int(found.truncated)),
        (f"empty answers ({kept})", console.fmt_int(found.empty)),
        ("failed (retried on rerun)", console.fmt_int(found.failed)),
    ]
    if seen.invalid:
        rows.append(("prompts that could not be built", console.fmt_int(seen.invalid)))
    rows += [
        ("prompt tokens", console.fmt_int(found.prompt_tokens)),
        ("completion tokens", console.fmt_int(found.completion_tokens)),
        ("wall time", f"{wall:,.1f} s"),
        ("rows/s", console.fmt_rate(found.answered / busy) if busy > 0 else "-"),
        (
            "completion tokens/s",
            console.fmt_rate(found.completion_tokens / busy) if busy > 0 else "-",
        ),
    ]
    if outcome.failed_rows != found.failed:
        rows.append(("failed rows on file", console.fmt_int(outcome.failed_rows)))
    console.summary_table(f"openkd generate: {job.files.output} ({outcome.status})", rows)


def _warn_if_truncating(job: Job, found: LabelCounts) -> None:
    """Many answers cut at the limit usually means --max-new-tokens is too small for the task."""
    if found.answered and found.truncated / found.answered > 0.05:
        share = 100 * found.truncated / found.answered
        console.warn(
            f"{share:.0f}% of answers hit --max-new-tokens {job.cfg.max_new_tokens}"
            + ("" if job.cfg.keep_truncated else " and were set aside")
            + "; consider a larger --max-new-tokens"
        )


def _raise_if_incomplete(job: Job, seen: SourceCounts, found: LabelCounts) -> None:
    push_note = "; the Hub push was skipped" if job.cfg.push_to_hub else ""
    if found.failed:
        raise OpenkdError(
            f"{found.failed:,} of {found.finished:,} prompts failed (reasons in "
            f"{job.files.failed}){push_note}; rerun the same command to retry them"
        )
    if seen.invalid:
        raise OpenkdError(
            f"{seen.invalid:,} prompts could not be built and were skipped (first: "
            f"{seen.problems[0]}){push_note}; fix or filter those rows and rerun the same command"
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
