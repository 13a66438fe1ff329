"""`openkd generate`: label every selected prompt with the teacher, crash-safely and resumably.

Order matters: everything that can be checked without a teacher (flags, teacher path, output
directory, dataset, columns, template, the first prompts) is checked first, because engine
starts are expensive. Then prompts stream from the dataset into the teacher, which is kept
full, and each answer is written as it lands (`label.py`); commits every `--commit-interval`
seconds bound what a kill can lose, and a rerun with the same arguments skips every id
already on disk (`resume.py`). `GenerateRun` takes those steps, each once: setup, label,
finish (whatever the ending: `finish.py` holds its parts), report (`summary.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.layout import OutputFiles, resolve_output
from openkd.data.metadata import GenerateMeta, check_compatible, label_settings, now, teacher_key
from openkd.data.sources import (
    Prompts,
    check_gold_answers,
    load_prompts,
    selection,
    source_stamp,
)
from openkd.errors import OpenkdError
from openkd.generate.backends.base import Sampling
from openkd.generate.card import write_card
from openkd.generate.finish import (
    Outcome,
    left_nothing,
    rewrite_failures,
    sidecar_size,
    start_meta,
    verification,
)
from openkd.generate.label import LabelCounts, Routing, label
from openkd.generate.outputs import (
    check_not_input,
    check_ours,
    check_output,
    exclusive,
    remove_all,
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
from openkd.generate.summary import (
    raise_if_incomplete,
    summary,
    warn_if_empty,
    warn_if_truncating,
)
from openkd.generate.writer import OutputWriter
from openkd.paths import require_local_model

if TYPE_CHECKING:
    from openkd.data.logprobs import SidecarWriter
    from openkd.generate.backends.base import Backend
    from openkd.generate.config import GenerateConfig
    from openkd.verify import Verifier

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


@dataclass
class Job:
    """What the run writes and how it asks the teacher, resolved and validated."""

    cfg: GenerateConfig
    files: OutputFiles
    sampling: Sampling
    teacher: str  # as it enters record ids (revision included)
    stamp: str | None  # the local dataset files' sizes and times (None for a Hub dataset)

    @property
    def selection(self) -> str | None:
        if self.stamp is None:
            return None
        return selection_key(self.cfg, self.stamp, self.sampling.as_dict())

    @property
    def label_settings(self) -> dict[str, Any]:
        """What must match for this run's rows to join the output's."""
        cfg = self.cfg
        soft = {"k": cfg.logprobs, "dtype": cfg.logprobs_dtype} if cfg.logprobs else None
        return label_settings(cfg.teacher, cfg.revision, self.sampling.as_dict(), soft)


def run(cfg: GenerateConfig) -> None:
    GenerateRun(cfg).run()


class GenerateRun:
    """One `openkd generate`, step by step as a recipe: `setup` (the resume state, the prompt
    source, the teacher, the metadata), `label`, `finish` (commit, and record how the run ended,
    however it ended), `report` (what the user reads). It owns the run's state, so each step
    happens once, in one place. A rerun of a finished run is answered from the index instead
    of `setup` to `finish` (`_replay`)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        self.cfg = cfg
        self.outcome = Outcome("stopped", now(), time.monotonic())
        self.job = prepare(cfg)
        self.files = self.job.files
        self.state = empty_state()
        self.seen = SourceCounts()  # the source's live counts once there is a source
        self.found = LabelCounts()
        self.meta: GenerateMeta | None = None
        self.writer: OutputWriter | None = None
        self.ended = False  # how the run ended is recorded: there is a summary to print

    def run(self) -> None:
        try:
            if not self.cfg.overwrite:
                _reconcile(self.job)  # re-sorts the rows on disk first, if the settings ask
            if self.cfg.overwrite or not self._replay():
                self._label_all()
        except BaseException:
            self.report(failing=True)
            raise
        self.report()

    def _label_all(self) -> None:
        prompts = load_prompts(self.cfg, system_prompt=self.cfg.system_prompt)
        with exclusive(self.files):
            source, backend = self.setup(prompts)
            try:
                if backend is not None:
                    self.label(source, backend)
                self.outcome.status = "complete"
            finally:
                self.finish()

    def setup(self, prompts: Prompts) -> tuple[PromptSource, Backend | None]:
        """What earlier runs left, the prompt source, the teacher (not started yet), and the
        metadata of a run that started; no teacher when nothing is left to label."""
        cfg, job = self.cfg, self.job
        self.state, previous = _resume(job)
        source = _source(job, prompts, self.state)
        self.seen = source.counts
        backend = None
        if source.peek() is not None:  # the first rows are built (and checked) before any teacher
            from openkd.generate.backends import make_backend
            from openkd.generate.backends.spec import teacher_spec

            backend = make_backend(teacher_spec(cfg))  # checks its settings; loads nothing yet
        if cfg.overwrite:  # only now: a bad prompt found by peek must not cost old data
            remove_all(self.files)
        _announce(job, source, self.state)
        self.meta = start_meta(cfg, self.files, job.sampling, self.state, previous)
        self.meta.write(self.files.meta)
        self.writer = OutputWriter(
            self.files, self.state.index, cfg.commit_interval, sidecar=_sidecar(cfg, job)
        )
        return source, backend

    def label(self, source: PromptSource, backend: Backend) -> None:
        assert self.writer is not None
        with _terminate_as_interrupt(), backend:
            if backend.in_flight() > 1:
                console.info(f"keeping {backend.in_flight():,} requests in flight")
            routing = _routing(self.cfg, frozenset(self.state.failed))
            label(backend, source, self.job.sampling, self.writer, routing, self.found)
            self.outcome.backend_versions = backend.versions()

    def finish(self) -> None:
        """Commit, compact the failures, finish metadata and card; on every exit.

        When the run is already failing (a write error, Ctrl-C, a dead teacher), a second error
        here is only a warning, so the first one stays the message the user sees.
        """
        assert self.writer is not None
        files, state, outcome, writer = self.files, self.state, self.outcome, self.writer
        failing = outcome.status != "complete"
        try:
            writer.commit()
            writer.close()
            if failing and left_nothing(files, state):
                return  # stopped before any answer: no output is left behind
            if not files.output.exists():  # every answer set aside: still an (empty) dataset
                files.output.touch()
            outcome.failed_rows = rewrite_failures(files, state, self.found, outcome.status)
            if outcome.status == "complete" and (outcome.failed_rows or self.seen.invalid):
                outcome.status = "incomplete"
            if self.cfg.verify and outcome.status == "complete":
                assert self.meta is not None
                self.meta.verification = outcome.verification = verification(files, self.cfg, state)
            self._record()
            if outcome.status == "complete" and self.job.selection:
                state.index.selection = {
                    "key": self.job.selection,
                    "selected": self.seen.selected,
                    "duplicates": self.seen.duplicates,
                }
                state.index.write(files.index)
        except (OpenkdError, OSError) as err:
            if not failing:
                raise
            console.warn(f"could not finish the output files: {err}")
        finally:
            writer.close()
            self.ended = failing
        self.ended = True

    def _record(self) -> None:
        """This run's end in the metadata (its line in the history, the totals) and the card."""
        meta, outcome = self.meta, self.outcome
        assert meta is not None
        counts = dataclasses.replace(self.state.counts, failed=outcome.failed_rows)
        entry = outcome.run_entry(self.cfg.backend, self.seen, self.found)
        meta.finish(outcome.status, counts, entry, outcome.backend_versions)
        if meta.logprobs is not None and self.writer is not None:
            meta.logprobs["bytes"], meta.logprobs["bytes_per_token"] = sidecar_size(
                self.files, self.writer
            )
            outcome.soft_labels = meta.logprobs
        meta.write(self.files.meta)
        write_card(self.files, meta)

    def report(self, *, failing: bool = False) -> None:
        """The summary, once the run's end is recorded (a failing run's too: the caller prints
        only its error); then, for a run that ended without an error: warnings, the output's
        path on stdout, the error of a run that left work undone, the Hub push."""
        cfg, files = self.cfg, self.files
        if self.ended:
            summary(files, cfg, self.seen, self.found, self.outcome)
        if failing:
            return
        assert self.meta is not None
        warn_if_truncating(cfg, self.found)
        warn_if_empty(files, cfg, self.meta.counts)
        console.stdout_line(str(files.output))
        raise_if_incomplete(files, cfg, self.seen, self.found)
        if cfg.push_to_hub:
            from openkd.generate.hub import push

            push(files, self.meta, cfg.push_to_hub, private=cfg.private)

    def _replay(self) -> bool:
        """A rerun of a finished run (same dataset files and settings, output untouched since)
        is answered from the index alone, without reading the dataset; False when it cannot."""
        job = self.job
        if not job.selection or not finished_selection(self.files, job.selection):
            return False
        with exclusive(self.files):
            done = finished_selection(self.files, job.selection)
            if done is None:  # changed while we waited for the lock: do the real thing
                return False
            previous = GenerateMeta.read(self.files.meta)
            check_compatible(previous, job.label_settings, self.files.output, True)
            self.seen = SourceCounts(
                selected=done["selected"],
                already_done=done["selected"] - done["duplicates"],
                duplicates=done["duplicates"],
            )
            output = self.files.output.name
            console.info(
                f"{self.seen.selected:,} prompts selected; {self.seen.already_done:,} rows "
                f"already in {output} are skipped (dataset files and settings unchanged since "
                "the run that wrote them)"
            )
            console.info(
                f"nothing to label: every selected prompt is in {output} (--overwrite relabels)"
            )
            from openkd.generate.ids import IdSet

            self.state = ResumeState(done=IdSet(), index=Index.read(self.files.index) or Index())
            self.meta = start_meta(self.cfg, self.files, job.sampling, self.state, previous)
            self.outcome.status = "complete"
            self._record()
            self.ended = True
        return True


def prepare(cfg: GenerateConfig) -> Job:
    """The checks that need neither teacher nor dataset: flags, teacher path, output."""
    sampling = sampling_from(cfg)
    if not cfg.greedy:
        console.warn(
            f"--temperature {cfg.temperature}: answers are sampled, not greedy; "
            "hard-label distillation normally uses --temperature 0"
        )
    files = resolve_output(cfg.output, cfg.shard_index)
    if cfg.backend in LOCAL_TEACHER_BACKENDS or (cfg.backend == "openai" and cfg.serve):
        require_local_model(cfg.teacher, "--teacher")
    if cfg.backend == "distilabel" and cfg.llm_class:
        from openkd.generate.backends.distilabel import import_llm_class

        import_llm_class(cfg.llm_class)  # a wrong class fails before the dataset is read
    check_output(files)
    check_not_input(files, cfg.dataset)
    if cfg.overwrite:
        check_ours(files)
    teacher = teacher_key(cfg.teacher, cfg.revision)
    return Job(cfg, files, sampling, teacher, source_stamp(cfg.dataset))


def _resume(job: Job) -> tuple[ResumeState, GenerateMeta | None]:
    """What earlier runs left (nothing with --overwrite), after checking it is compatible."""
    if job.cfg.overwrite:
        return empty_state(), None
    previous = GenerateMeta.read(job.files.meta)
    has_rows = any(p.is_file() and p.stat().st_size for p in job.files.row_files)
    check_compatible(previous, job.label_settings, job.files.output, has_rows)
    state = load_state(job.files)
    if job.files.logprobs.is_dir():
        from openkd.data.logprobs import repair

        if cut := repair(job.files.logprobs):
            state.repaired.append((job.files.logprobs, cut))
    for path, cut in state.repaired:
        console.warn(
            f"{path}: cut {cut} bytes of a torn last line (an earlier run was killed or ran "
            "out of disk)"
        )
    return state, (previous if state.has_rows else None)


def _reconcile(job: Job) -> None:
    """Before anything is labelled: refuse settings that would mix labels, and re-sort the rows
    on disk for a changed --eval-fraction or --keep-truncated (or finish an interrupted re-sort)."""
    from openkd.generate.rerun import describe, plan_rerun

    files = job.files
    with exclusive(files):
        previous = GenerateMeta.read(files.meta)
        has_rows = any(p.is_file() and p.stat().st_size for p in files.row_files)
        plan = plan_rerun(previous, job.cfg, has_rows)
        if not (plan.resplit or files.resplit.exists()):
            return
        from openkd.generate.resplit import resplit

        for line in describe(plan):
            console.info(line)
        moves = resplit(files, _routing(job.cfg))
        moved = ", ".join(f"{n:,} {a} -> {b}" for (a, b), n in sorted(moves.items()))
        console.info(f"rows re-sorted: {moved or 'none had to move'}")
        if previous is not None:  # the rows on disk now follow this run's settings
            previous.config.update({name: new for name, (_, new) in plan.resplit.items()})
            previous.source.update(
                {n: new for n, (_, new) in plan.resplit.items() if n in previous.source}
            )
            previous.write(files.meta)


def _routing(cfg: GenerateConfig, earlier_failures: frozenset[str] = frozenset()) -> Routing:
    return Routing(
        cfg.eval_fraction,
        cfg.keep_truncated,
        earlier_failures,
        logprobs=bool(cfg.logprobs),
        verifier=_verifier(cfg),
        keep_rejected=cfg.keep == "all",
    )


def _source(job: Job, prompts: Prompts, state: ResumeState) -> PromptSource:
    from openkd.generate.ids import RecordIds

    cfg = job.cfg
    positions = selection(
        len(prompts.dataset), max_samples=cfg.max_samples, shuffle_seed=cfg.shuffle_seed
    )
    if cfg.verify:
        check_gold_answers(prompts.dataset, positions, cfg.answer_column, cfg.dataset)
    return PromptSource(
        prompts.dataset,
        prompts.builder,
        positions,
        ids=RecordIds(job.teacher, job.sampling.as_dict()),
        shard=cfg.shard_index,
        done=state.done,
        samples=cfg.num_samples,
        gold_column=cfg.answer_column if cfg.verify else None,
        spill_dir=job.files.output.parent,
    )


def _verifier(cfg: GenerateConfig) -> Verifier | None:
    if not cfg.verify:
        return None
    from openkd.verify import make_verifier

    return make_verifier(cfg.verify, cfg.answer_regex)


def _sidecar(cfg: GenerateConfig, job: Job) -> SidecarWriter | None:
    """Where --logprobs rows go; the teacher and output travel in its schema metadata."""
    if not cfg.logprobs:
        return None
    from openkd.data.logprobs import SidecarWriter

    meta = {"teacher": job.teacher, "output": job.files.output.name}
    return SidecarWriter(job.files.logprobs, cfg.logprobs, cfg.logprobs_dtype, meta=meta)


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
