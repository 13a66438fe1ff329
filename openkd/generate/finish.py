"""The end of a run, however it ends: commit what finished, compact the failures file, finish
the metadata and the card, and let a finished selection make the next rerun free."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.jsonl import write_jsonl_atomic
from openkd.data.metadata import Counts, GenerateMeta, now
from openkd.errors import OpenkdError
from openkd.generate.card import write_card
from openkd.system import library_versions

if TYPE_CHECKING:
    from openkd.data.layout import OutputFiles
    from openkd.generate.backends.base import Sampling
    from openkd.generate.config import GenerateConfig
    from openkd.generate.label import LabelCounts
    from openkd.generate.resume import ResumeState
    from openkd.generate.source import SourceCounts
    from openkd.generate.writer import OutputWriter


@dataclass
class Outcome:
    """How this invocation ended, for the metadata, the summary and the exit status."""

    status: str  # complete, incomplete (failed or invalid prompts), stopped
    started_at: str
    started_wall: float
    backend_versions: dict[str, str] = field(default_factory=dict)
    failed_rows: int = 0  # failures on file after this run (earlier ones included)
    verification: dict[str, Any] | None = None  # --verify: pass rates over the output
    soft_labels: dict[str, Any] | None = None  # --logprobs: k, dtype, bytes, bytes_per_token

    @property
    def wall(self) -> float:
        return time.monotonic() - self.started_wall

    def run_entry(self, backend: str, seen: SourceCounts, found: LabelCounts) -> dict[str, Any]:
        """This run's line in the metadata's history."""
        busy = found.seconds
        return {
            "started_at": self.started_at,
            "finished_at": now(),
            "status": self.status,
            "backend": backend,
            "selected": seen.selected,
            "already_done": seen.already_done,
            "duplicates": seen.duplicates,
            "invalid": seen.invalid,
            "labelled": found.answered,
            "failed": found.failed,
            "prompt_tokens": found.prompt_tokens,
            "completion_tokens": found.completion_tokens,
            "wall_seconds": round(self.wall, 3),
            "labelling_seconds": round(busy, 3),
            "rows_per_second": round(found.answered / busy, 3) if busy > 0 else None,
            "completion_tokens_per_second": round(found.completion_tokens / busy, 3)
            if busy > 0
            else None,
        }


def start_meta(
    cfg: GenerateConfig,
    files: OutputFiles,
    sampling: Sampling,
    state: ResumeState,
    previous: GenerateMeta | None,
) -> GenerateMeta:
    from openkd.generate.rerun import dataset_path

    counts = _counts(state, len(state.failed))
    meta = GenerateMeta.start(
        config=cfg.to_yaml_dict(),
        files={
            kind: files.kind_path(kind).name for kind in ("train", "eval", "truncated", "failed")
        }
        | {"card": files.card.name},
        sampling=sampling.as_dict(),
        counts=counts,
        previous=previous,
        versions=library_versions("datasets", "huggingface_hub"),
        llm_class=cfg.llm_class if cfg.backend == "distilabel" else None,
    )
    if path := dataset_path(cfg.dataset):  # a rerun from another directory is the same dataset
        meta.source["dataset_path"] = path
    return meta


def finish_run(
    files: OutputFiles,
    cfg: GenerateConfig,
    state: ResumeState,
    seen: SourceCounts,
    writer: OutputWriter,
    found: LabelCounts,
    meta: GenerateMeta,
    outcome: Outcome,
    selection: str | None,
) -> None:
    """Commit, compact the failures, finish metadata and card; on every exit.

    When the run is already failing (a write error, Ctrl-C, a dead teacher), a second error
    here is only a warning, so the first one stays the message the user sees; the summary is
    printed here then, as the caller will not get to it.
    """
    failing = outcome.status != "complete"
    try:
        writer.commit()
        writer.close()
        if failing and _left_nothing(files, state):
            return  # stopped before any answer: no output is left behind
        if not files.output.exists():  # every answer set aside: still an (empty) dataset
            files.output.touch()
        outcome.failed_rows = _rewrite_failures(files, state, found, outcome.status)
        if outcome.status == "complete" and (outcome.failed_rows or seen.invalid):
            outcome.status = "incomplete"
        if cfg.verify and outcome.status == "complete":
            _verification(files, cfg, state, meta, outcome)
        meta.finish(
            outcome.status,
            _counts(state, outcome.failed_rows),
            outcome.run_entry(cfg.backend, seen, found),
            outcome.backend_versions,
        )
        if meta.logprobs is not None:
            meta.logprobs.update(_sidecar_size(files, writer))
            outcome.soft_labels = meta.logprobs
        meta.write(files.meta)
        write_card(files, meta)
        if outcome.status == "complete" and selection:
            state.index.selection = {
                "key": selection,
                "selected": seen.selected,
                "duplicates": seen.duplicates,
            }
            state.index.write(files.index)
    except (OpenkdError, OSError) as err:
        if not failing:
            raise
        console.warn(f"could not finish the output files: {err}")
    finally:
        writer.close()
        if failing:
            from openkd.generate.summary import summary

            summary(files, cfg, seen, found, outcome)


def _left_nothing(files: OutputFiles, state: ResumeState) -> bool:
    """True (after removing this run's metadata) when the run stopped before writing a row
    into an output that had none: a failed start leaves no files behind."""
    if state.has_rows or state.failed:
        return False
    if any(p.exists() and p.stat().st_size for p in (*files.row_files, files.failed)):
        return False
    if files.logprobs.is_dir() and any(files.logprobs.iterdir()):
        return False
    for path in (*files.all(), files.logprobs):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    return True


def _rewrite_failures(
    files: OutputFiles, state: ResumeState, found: LabelCounts, status: str
) -> int:
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


def _verification(
    files: OutputFiles,
    cfg: GenerateConfig,
    state: ResumeState,
    meta: GenerateMeta,
    outcome: Outcome,
) -> None:
    """--keep first-verified, then the pass rates over every answer on file."""
    from openkd.generate.resume import load_state
    from openkd.generate.verification import keep_first_verified, pass_rates

    if cfg.keep == "first-verified" and keep_first_verified(files):
        state.index = load_state(files).index  # the files were rewritten: count them again
    rates = pass_rates(files, cfg.num_samples)
    meta.verification = {"method": cfg.verify, "keep": cfg.keep or "all-verified", **rates}
    outcome.verification = meta.verification


def _sidecar_size(files: OutputFiles, writer: OutputWriter) -> dict[str, Any]:
    """The sidecar's size on disk, and what this run's rows cost per answer token."""
    size = sum(p.stat().st_size for p in files.logprobs.glob("part-*.arrow"))
    written = writer.sidecar.bytes_written if writer.sidecar is not None else 0
    per_token = round(written / writer.soft_tokens, 1) if writer.soft_tokens else None
    return {"bytes": size, "bytes_per_token": per_token}


def _counts(state: ResumeState, failed_rows: int) -> Counts:
    return dataclasses.replace(state.counts, failed=failed_rows)
