"""`openkd eval` in benchmark mode: how often does each model get the gold final answer?

No teacher run is needed. Every model given (the student, `--base`, a live `--teacher`)
answers every problem of every benchmark `--num-samples` times through the same backends as
`openkd generate` (one engine per model for all benchmarks), and each answer's final answer
is checked against the gold one with the verifiers of `generate --verify`: math-verify, or
exact match of what `--answer-regex` (or a named benchmark's own rule) extracts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from openkd import __version__, console
from openkd.data.sources import load_source
from openkd.errors import ConfigError, OpenkdError
from openkd.eval import report as rp
from openkd.eval import scores
from openkd.eval.config import DEFAULT_MAX_NEW_TOKENS, EvalConfig
from openkd.eval.examples import Decoding, read_decoding
from openkd.eval.tasks import Loaded, Task, load, resolve
from openkd.generate.backends.base import Completion, Request, Sampling
from openkd.paths import check_writable, refuse_input_as_output
from openkd.verify import Verdict, make_verifier

# How benchmark answers are graded and aggregated: a report of another version is recomputed.
SCORING = "openkd.eval.benchmark/1"


def benchmark_mode(cfg: EvalConfig) -> bool:
    """Whether this run scores gold answers (see --mode); reads --dataset's columns in auto."""
    if cfg.mode != "auto":
        return cfg.mode == "benchmark"
    if cfg.benchmark:
        return True
    if cfg.teacher or cfg.dataset is None:
        return False
    columns = load_source(cfg.dataset, split=cfg.split, subset=cfg.subset).column_names
    gold_only = cfg.reference_column not in columns and cfg.answer_column in columns
    if not gold_only and (cfg.num_samples > 1 or cfg.temperature > 0):
        raise ConfigError(
            f"--dataset {cfg.dataset} has the teacher's answers in column "
            f"'{cfg.reference_column}', so it is scored for agreement with them, on greedy "
            "answers; drop --num-samples and --temperature, or pass --mode benchmark to score "
            f"its gold answers in '{cfg.answer_column}'"
        )
    if gold_only:
        console.info(
            f"--dataset {cfg.dataset} has gold answers ('{cfg.answer_column}') and no teacher's "
            f"answers ('{cfg.reference_column}'): scoring final-answer accuracy (benchmark mode)"
        )
    return gold_only


def run(cfg: EvalConfig, out_dir: Path, started: float) -> None:
    from openkd.eval.run import _TokenCounter

    tasks = resolve(cfg)
    _check_inputs(cfg, tasks, out_dir)
    named = {"student": cfg.student, "base": cfg.base, "teacher": cfg.teacher}
    models = {role: name for role, name in named.items() if name}
    fingerprint = _fingerprint(cfg, tasks, models)
    report_path = out_dir / rp.REPORT
    if not cfg.overwrite and _reuse(report_path, fingerprint):
        return
    check_writable(out_dir, "--output-dir")
    loaded = [load(task, cfg) for task in tasks]
    for part in loaded:
        console.info(f"{part.task.describe()}; {len(part.items):,} problems")
    counter = _TokenCounter(cfg)
    decoding = _decoding(cfg)
    sampling = Sampling(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=decoding.max_new_tokens,
        stop=decoding.stop,
        seed=cfg.seed,
    )
    prompts = [item.prompt for part in loaded for item in part.items]
    how = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature:g}"
    console.info(
        f"scoring {', '.join(f'{r} {n}' for r, n in models.items())} on {len(prompts):,} "
        f"problems x {cfg.num_samples} sample(s) ({how}, max {decoding.max_new_tokens:,} new "
        f"tokens, from {decoding.source})"
    )
    timings = {role: rp.Timing() for role in models}
    graded: dict[str, list[list[list[scores.Graded]]]] = {}
    for role, model in models.items():
        answers = _answer(cfg, role, model, prompts, sampling, timings[role])
        graded[role] = _grade(loaded, answers, counter)
    report = scores.build_report(
        cfg, loaded, graded, models, decoding, timings, counter.unit, fingerprint, started
    )
    for entry, note in zip(report["benchmarks"], _decontamination(tasks), strict=True):
        if note:
            entry["decontaminated"] = note
    rp.write_outputs(out_dir, report, scores.example_rows(loaded, graded))
    scores.print_table(report)
    console.summary_table(
        "openkd eval: done",
        [
            ("problems", console.fmt_int(len(prompts))),
            *[(f"{r} answer tokens", console.fmt_int(t.tokens)) for r, t in timings.items()],
            ("wall time", f"{report['wall_seconds']:,.1f} s"),
            ("report", str(report_path)),
            ("per-problem answers", str(out_dir / rp.EXAMPLES)),
        ],
    )
    console.stdout_line(str(report_path))


def _decoding(cfg: EvalConfig) -> Decoding:
    """--max-new-tokens and --stop; for a --dataset, what its generate run recorded."""
    if cfg.dataset is not None:
        return read_decoding(cfg)[0]
    source = "--max-new-tokens" if cfg.max_new_tokens else "default"
    return Decoding(cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, tuple(cfg.stop or ()), source)


def _check_inputs(cfg: EvalConfig, tasks: list[Task], out_dir: Path) -> None:
    """No local benchmark file is, holds or sits in --output-dir (eval writes there)."""
    from openkd.eval.run import _dataset_folder

    local = {
        f"--benchmark {t.name}": t.source for t in tasks if cfg.benchmark and _is_local(t.source)
    }
    refuse_input_as_output(
        out_dir,
        dict(local),
        output_flag="--output-dir",
        written=lambda rel: rel.parts[0] in (rp.REPORT, rp.EXAMPLES),
    )
    for flag, source in local.items():
        if _dataset_folder(Path(source).expanduser()) == out_dir.resolve():
            raise ConfigError(
                f"--output-dir {cfg.output_dir} is the directory of {flag}; eval never writes "
                "among its inputs: pass another --output-dir"
            )


def _decontamination(tasks: list[Task]) -> list[str | None]:
    """Per task, "training prompts decontaminated against NAME (N-grams)" when this eval is a
    stage of `openkd run` whose recipe labels the output of its `decontaminate:` section and
    that section checked against the same benchmark; None otherwise."""
    import yaml
    from pydantic import ValidationError

    from openkd.decontaminate.config import DecontaminateConfig
    from openkd.pipeline import RECIPE_ENV

    notes: list[str | None] = [None] * len(tasks)
    recipe = os.environ.get(RECIPE_ENV)
    if not recipe:
        return notes
    try:
        data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
        section = DecontaminateConfig.model_validate(data["decontaminate"])
        labelled = Path(data["generate"]["dataset"]).expanduser().resolve()
    except (OSError, yaml.YAMLError, ValidationError, KeyError, TypeError):
        return notes  # not a recipe, or one without both sections: nothing to say
    if labelled != Path(section.output).expanduser().resolve():
        return notes  # the teacher labels other prompts than the decontaminated ones
    for i, task in enumerate(tasks):
        sources = {task.source, task.named.hub_id if task.named else task.source}
        for bench in section.benchmark:
            if bench.label == task.name or bench.source in sources:
                notes[i] = (
                    f"training prompts decontaminated against {bench.label} "
                    f"({section.ngram_size}-grams)"
                )
    return notes


def _is_local(source: str) -> bool:
    from openkd.data.sources import local_files

    return local_files(source) is not None


def _fingerprint(cfg: EvalConfig, tasks: list[Task], models: dict[str, str]) -> str:
    """Everything the scores depend on: settings, models, each benchmark's data and how it is
    prompted and graded. Hub benchmarks are identified by id (their cache is not hashed)."""
    payload = {
        "openkd": __version__,
        "scoring": SCORING,
        "verify": rp.SCORING,
        "config": {
            k: v for k, v in cfg.to_yaml_dict().items() if k not in ("overwrite", "output_dir")
        },
        "benchmarks": [{**t.resolution(), "data": rp.dataset_fingerprint(t.source)} for t in tasks],
        "models": {role: rp.model_fingerprint(spec) for role, spec in models.items()},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _reuse(report_path: Path, fingerprint: str) -> bool:
    previous = rp.read_report(report_path)
    if previous is None:
        return False
    if previous.get("fingerprint") != fingerprint or previous.get("mode") != scores.MODE:
        console.info(f"{report_path} was computed from other inputs; recomputing it")
        return False
    console.info(
        f"reusing {report_path}: same models, benchmarks and settings (pass --overwrite to "
        "recompute)"
    )
    scores.print_table(previous)
    console.stdout_line(str(report_path))
    return True


# --- answering and grading ---------------------------------------------------------------


def _answer(
    cfg: EvalConfig,
    role: str,
    model: str,
    prompts: list[Any],
    sampling: Sampling,
    timing: rp.Timing,
) -> list[list[Completion]]:
    """`--num-samples` answers to every prompt by `model`, in order; sample i of a prompt is
    drawn with seed + i (the seed scheme of `generate --num-samples`)."""
    from openkd.eval.run import _teacher_spec
    from openkd.generate.backends import make_backend
    from openkd.generate.progress import rows_and_tokens as bar

    n = cfg.num_samples
    spec = _teacher_spec(cfg, role, model, sampling)
    console.info(f"{role}: loading {model} ({spec.backend})")
    out: list[list[Completion | None]] = [[None] * n for _ in prompts]
    with make_backend(spec) as backend:
        t0 = time.monotonic()
        requests = (
            Request(id=f"{i}:{s}", messages=p, row=i, sample=s)
            for i, p in enumerate(prompts)
            for s in range(n)
        )
        with bar(f"{role} answering", len(prompts) * n) as advance:
            for request, completion in backend.stream(requests, sampling):
                out[request.row][request.sample] = completion
                timing.tokens += completion.completion_tokens
                advance(1, completion.completion_tokens)
        timing.seconds = time.monotonic() - t0
        timing.versions = backend.versions()
    missing = Completion.failure("the model stopped before answering")
    answered = [[c if c is not None else missing for c in samples] for samples in out]
    failed = sum(c.failed for samples in answered for c in samples)
    if failed == len(prompts) * n and prompts:
        first = next(c.error for samples in answered for c in samples if c.error)
        raise OpenkdError(
            f"{role} {model} answered none of the {len(prompts) * n:,} requests (first error: "
            f"{first}); check the model and its backend"
        )
    if failed:
        console.warn(f"{role}: {failed:,} requests failed; they count as wrong answers")
    return answered


def _grade(
    loaded: list[Loaded], answers: list[list[Completion]], counter: Any
) -> list[list[list[scores.Graded]]]:
    """Each benchmark's answers, problem by problem, graded by the benchmark's verifier."""
    out = []
    position = 0
    for part in loaded:
        check = make_verifier(part.task.verify, part.task.answer_regex)
        problems = []
        for item in part.items:
            samples = []
            for completion in answers[position]:
                text = completion.text or ""
                if completion.failed:
                    verdict = Verdict(False, None, item.gold, "exact", completion.error)
                else:
                    verdict = check(text, item.gold)
                samples.append(
                    scores.Graded(
                        text=text,
                        finish_reason=completion.finish_reason,
                        tokens=counter.count(text),
                        correct=verdict.correct,
                        answer=verdict.answer,
                        reason=verdict.reason,
                        error=completion.error,
                    )
                )
            problems.append(samples)
            position += 1
        out.append(problems)
    return out
