"""What the end of a run (`GenerateRun.finish`) is made of: how it ended (`Outcome`), the
metadata it started with, the failures file compacted, the pass rates, the sidecar's size."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openkd.data.jsonl import write_jsonl_atomic
from openkd.data.metadata import GenerateMeta, RunEntry, RunStatus, SoftLabels, now
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

    status: RunStatus  # complete, incomplete (failed or invalid prompts), stopped
    started_at: str
    started_wall: float
    backend_versions: dict[str, str] = field(default_factory=dict)
    failed_rows: int = 0  # failures on file after this run (earlier ones included)
    verification: dict[str, Any] | None = None  # --verify: pass rates over the output
    soft_labels: SoftLabels | None = None  # --logprobs: k, dtype, bytes, bytes_per_token

    @property
    def wall(self) -> float:
        return time.monotonic() - self.started_wall

    def run_entry(self, backend: str, seen: SourceCounts, found: LabelCounts) -> RunEntry:
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

    counts = dataclasses.replace(state.counts, failed=len(state.failed))
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


def left_nothing(files: OutputFiles, state: ResumeState) -> bool:
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


def rewrite_failures(
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


def verification(files: OutputFiles, cfg: GenerateConfig, state: ResumeState) -> dict[str, Any]:
    """--keep first-verified, then the pass rates over every answer on file."""
    from openkd.generate.resume import load_state
    from openkd.generate.verification import keep_first_verified, pass_rates

    if cfg.keep == "first-verified" and keep_first_verified(files):
        state.index = load_state(files).index  # the files were rewritten: count them again
    rates = pass_rates(files, cfg.num_samples)
    return {"method": cfg.verify, "keep": cfg.keep or "all-verified", **rates}


def sidecar_size(files: OutputFiles, writer: OutputWriter) -> tuple[int, float | None]:
    """The sidecar's size on disk, and what this run's rows cost per answer token."""
    size = sum(p.stat().st_size for p in files.logprobs.glob("part-*.arrow"))
    written = writer.sidecar.bytes_written if writer.sidecar is not None else 0
    per_token = round(written / writer.soft_tokens, 1) if writer.soft_tokens else None
    return size, per_token
