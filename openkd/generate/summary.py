"""What the user reads at the end of `openkd generate`: the summary table, a warning when
answers keep hitting the token limit, and the one-line error of a run that left work undone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from openkd import console
from openkd.errors import OpenkdError

if TYPE_CHECKING:
    from openkd.data.layout import OutputFiles
    from openkd.data.metadata import Counts
    from openkd.generate.config import GenerateConfig
    from openkd.generate.finish import Outcome
    from openkd.generate.label import LabelCounts
    from openkd.generate.source import SourceCounts

TRUNCATION_WARNING = 0.05  # share of answers cut at --max-new-tokens that earns a warning


def summary(
    files: OutputFiles,
    cfg: GenerateConfig,
    seen: SourceCounts,
    found: LabelCounts,
    outcome: Outcome,
) -> None:
    busy = found.seconds
    kept = "kept" if cfg.keep_truncated else "set aside"
    selected = (
        "prompts selected"
        if cfg.num_samples == 1
        else f"answers to give ({cfg.num_samples} a prompt)"
    )
    if seen.scanned < seen.total:  # stopped before the whole selection was read
        selected += f" (in the first {seen.scanned:,} of {seen.total:,} read before the stop)"
    rows = [
        (selected, console.fmt_int(seen.selected)),
        ("already done (skipped)", console.fmt_int(seen.already_done)),
        ("repeated prompts (labelled once)", console.fmt_int(seen.duplicates)),
        ("labelled now", console.fmt_int(found.answered)),
        ("  -> train rows", console.fmt_int(found.train)),
    ]
    if cfg.eval_fraction:
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
        ("wall time", f"{outcome.wall:,.1f} s"),
        ("rows/s", console.fmt_rate(found.answered / busy) if busy > 0 else "-"),
        (
            "completion tokens/s",
            console.fmt_rate(found.completion_tokens / busy) if busy > 0 else "-",
        ),
    ]
    if outcome.failed_rows != found.failed:
        rows.append(("failed rows on file", console.fmt_int(outcome.failed_rows)))
    checked = outcome.verification
    if checked and checked["answers"]:
        rows.append(
            (
                f"verified ({checked['method']}) / rejected now",
                f"{found.verified:,} / {found.rejected:,}",
            )
        )
        rates = [
            f"{k} {v:.1%}" for k, v in checked.items() if k.startswith("pass@") and v is not None
        ]
        rows.append((f"pass rate over {checked['prompts']:,} prompts", ", ".join(rates)))
    soft = outcome.soft_labels
    if soft:
        per_token = f", {soft['bytes_per_token']} bytes/token" if soft["bytes_per_token"] else ""
        rows.append(
            (
                f"top-{soft['k']} log-probabilities",
                f"{soft['bytes'] / 2**20:,.1f} MiB{per_token}",
            )
        )
    console.summary_table(f"openkd generate: {files.output} ({outcome.status})", rows)


def warn_if_truncating(cfg: GenerateConfig, found: LabelCounts) -> None:
    """Many answers cut at the limit usually means --max-new-tokens is too small for the task."""
    if found.answered and found.truncated / found.answered > TRUNCATION_WARNING:
        share = 100 * found.truncated / found.answered
        console.warn(
            f"{share:.0f}% of answers hit --max-new-tokens {cfg.max_new_tokens}"
            + ("" if cfg.keep_truncated else " and were set aside")
            + "; consider a larger --max-new-tokens"
        )


def warn_if_empty(files: OutputFiles, cfg: GenerateConfig, counts: Counts) -> None:
    """An output with no row to train on says why, instead of looking like a success."""
    if counts.train.rows or not (counts.truncated.rows or counts.rejected.rows or counts.eval.rows):
        return
    causes = []
    if counts.truncated.rows:
        causes.append(
            f"{counts.truncated.rows:,} answers cut at --max-new-tokens {cfg.max_new_tokens} or "
            f"empty are set aside in {files.truncated.name} (raise --max-new-tokens, or pass "
            "--keep-truncated)"
        )
    if counts.rejected.rows:
        rejected = files.kind_path("rejected")
        causes.append(
            f"{counts.rejected.rows:,} answers that failed --verify are in {rejected.name} "
            f"(a wrong --answer-column, or answers the verifier cannot extract{_examples(rejected)})"
        )
    if counts.eval.rows:
        causes.append(f"{counts.eval.rows:,} rows are held out in {files.eval.name}")
    console.warn(f"{files.output.name} has 0 rows to train on: {'; '.join(causes)}")


def _examples(rejected: Path, count: int = 3) -> str:
    """`; extracted vs gold: '7' vs '12', ...` from the first rejected rows."""
    from itertools import islice

    from openkd.data.jsonl import iter_jsonl

    pairs = []
    for _, row in islice(iter_jsonl(rejected), count) if rejected.is_file() else ():
        verdict = row.get("verification") or {}
        pairs.append(f"{verdict.get('answer')!r} vs {verdict.get('gold')!r}")
    return f"; extracted vs gold: {', '.join(pairs)}" if pairs else ""


def raise_if_incomplete(
    files: OutputFiles, cfg: GenerateConfig, seen: SourceCounts, found: LabelCounts
) -> None:
    push_note = "; the Hub push was skipped" if cfg.push_to_hub else ""
    if found.failed:
        raise OpenkdError(
            f"{found.failed:,} of {found.finished:,} prompts failed (reasons in "
            f"{files.failed}){push_note}; rerun the same command to retry them"
        )
    if seen.invalid:
        raise OpenkdError(
            f"{seen.invalid:,} prompts could not be built and were skipped (first: "
            f"{seen.problems[0]}){push_note}; fix or filter those rows and rerun the same command"
        )
