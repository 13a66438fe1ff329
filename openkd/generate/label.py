"""The labelling loop: answers stream in from the teacher and out to the files as they land.

The teacher runs in a worker thread (`Pump`), fed from the prompt source; this thread sorts
each finished answer into its file (train, eval, truncated, failed), commits on the writer's
clock, and keeps the progress bar current. It never waits for a group of answers: whatever
has finished is handled, then it waits at most until the next commit is due.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from openkd.data.layout import RowKind
from openkd.data.schema import FINISH_LENGTH, FailureRow, LabelledRow, is_complete, make_record
from openkd.generate.backends.base import Completion
from openkd.generate.pump import Pump
from openkd.generate.source import in_eval_split

if TYPE_CHECKING:
    from openkd.generate.backends.base import Backend, Request, Sampling
    from openkd.generate.source import PromptSource
    from openkd.generate.writer import OutputWriter
    from openkd.verify import Verifier


@dataclass
class LabelCounts:
    """What this invocation's teacher answered (the index keeps totals over all runs)."""

    answered: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0  # cut at --max-new-tokens
    empty: int = 0
    filtered: int = 0  # truncated or empty answers set aside
    failed: int = 0
    verified: int = 0  # --verify: answers whose final answer matched the gold one
    rejected: int = 0  # --verify: answers set aside in <output>.rejected.jsonl
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    failures: dict[str, FailureRow] = field(default_factory=dict)  # this run's, by id
    recovered: set[str] = field(default_factory=set)  # earlier failures answered now

    @property
    def finished(self) -> int:
        return self.answered + self.failed


@dataclass(frozen=True)
class Routing:
    """Where answers go: the held-out share, whether incomplete answers are kept, and whether
    an answer must verify against the gold one to be trained on."""

    eval_fraction: float
    keep_truncated: bool
    earlier_failures: frozenset[str] = frozenset()
    logprobs: bool = False  # every answer must come with its log-probabilities
    verifier: Verifier | None = None
    keep_rejected: bool = False  # --keep all: verdicts are recorded, nothing is set aside

    def kind(self, record: LabelledRow) -> RowKind:
        if not is_complete(record) and not self.keep_truncated:
            return "truncated"
        verdict = record.get("verification")
        if verdict is not None and not verdict["correct"] and not self.keep_rejected:
            return "rejected"
        # A prompt's samples are held out (or not) together.
        key = record.get("prompt_id") or record["id"]
        return "eval" if in_eval_split(key, self.eval_fraction) else "train"


def label(
    backend: Backend,
    source: PromptSource,
    sampling: Sampling,
    writer: OutputWriter,
    routing: Routing,
    counts: LabelCounts,
) -> None:
    """Answer every request of `source`, writing each answer as it lands."""
    from openkd.generate.progress import labelling

    started = time.monotonic()
    pump = Pump(backend.stream(source, sampling), stop=backend.stop)
    with labelling(source.total) as bar:
        try:
            with pump:
                for group in pump.groups(writer.seconds_to_commit):
                    for request, completion in group:
                        _sort(request, completion, writer, routing, counts)
                    writer.commit_if_due()
                    bar.update(_decided(source, counts), counts.answered, counts.completion_tokens)
        finally:
            # Stopped early (Ctrl-C, SIGTERM, a dead teacher): answers that finished are kept.
            for request, completion in pump.leftovers():
                _sort(request, completion, writer, routing, counts)
            counts.seconds = time.monotonic() - started
            bar.update(_decided(source, counts), counts.answered, counts.completion_tokens)


def _decided(source: PromptSource, counts: LabelCounts) -> int:
    """Rows whose fate is known: another shard's, skipped, invalid, answered or failed."""
    seen = source.counts
    return seen.scanned - seen.selected + seen.already_done + seen.duplicates + counts.finished


def _sort(
    request: Request,
    completion: Completion,
    writer: OutputWriter,
    routing: Routing,
    counts: LabelCounts,
) -> None:
    if routing.logprobs and not completion.failed and completion.logprobs is None:
        completion = Completion.failure("the teacher returned no log-probabilities")
    if completion.failed:
        counts.failed += 1
        row: FailureRow = {
            "id": request.id,
            "prompt": request.messages,
            "source_index": request.row,
            "error": completion.error or "the teacher returned no text",
        }
        counts.failures[request.id] = row
        writer.add_failure(row)
        return
    if request.id in routing.earlier_failures:
        counts.recovered.add(request.id)
    record = make_record(
        id=request.id,
        prompt=request.messages,
        text=completion.text or "",
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        source_index=request.row,
    )
    if request.prompt_id is not None:
        record["sample"] = request.sample
        record["prompt_id"] = request.prompt_id
    if routing.verifier is not None:
        record["answer"] = request.gold  # the gold answer travels with the row (eval reads it)
    if routing.verifier is not None and is_complete(record):
        verdict = routing.verifier(completion.text or "", request.gold or "")
        record["verification"] = verdict.to_dict()
        counts.verified += verdict.correct
    kind = routing.kind(record)
    writer.add(kind, record, completion.logprobs)
    counts.answered += 1
    counts.prompt_tokens += completion.prompt_tokens
    counts.completion_tokens += completion.completion_tokens
    if completion.finish_reason == FINISH_LENGTH:
        counts.truncated += 1
    elif not is_complete(record):
        counts.empty += 1
    if kind == "truncated":
        counts.filtered += 1
    else:
        setattr(counts, kind, getattr(counts, kind) + 1)
