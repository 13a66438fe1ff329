"""`openkd eval`: how closely does the student reproduce its teacher on held-out prompts?

The student (and `--base`, the untrained student) answer every prompt through the same
backends as `openkd generate`, with the teacher's decoding; the answers are compared with the
teacher's (recorded, or live with `--teacher`). Each model's likelihood of the teacher's
answers is measured teacher-forced, tokenised exactly like training. Likelihoods are computed
before any vLLM engine starts, so the two never hold GPU memory at the same time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.layout import OutputFiles
from openkd.data.metadata import GenerateMeta
from openkd.data.schema import FINISH_STOP
from openkd.errors import ConfigError, OpenkdError
from openkd.eval import report as rp
from openkd.eval.config import EvalConfig
from openkd.eval.examples import (
    Example,
    has_reference,
    read_decoding,
    read_examples,
    with_references,
)
from openkd.generate.backends.base import Completion, Sampling
from openkd.paths import (
    check_writable,
    model_path,
    refuse_input_as_output,
    require_local_model,
)
from openkd.system import free_memory

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec

LOCAL_BACKENDS = ("vllm", "transformers")


def run(cfg: EvalConfig) -> None:
    started = time.monotonic()
    out_dir = Path(cfg.output_dir).expanduser()
    _check_output_dir(cfg, out_dir)
    _check_models(cfg)
    from openkd.eval import benchmark

    if benchmark.benchmark_mode(cfg):
        benchmark.run(cfg, out_dir, started)
        return
    assert cfg.dataset is not None  # the config requires --dataset without --benchmark
    decoding, meta = read_decoding(cfg)
    named = {"student": cfg.student, "base": cfg.base, "teacher": cfg.teacher}
    models: dict[str, str] = {role: name for role, name in named.items() if name}
    fingerprint = rp.inputs_fingerprint(cfg.to_yaml_dict(), cfg.dataset, models)
    report_path = out_dir / rp.REPORT
    if not cfg.overwrite and _reuse(report_path, fingerprint):
        return
    check_writable(out_dir, "--output-dir")
    examples, unreferenced = read_examples(cfg), 0
    if not cfg.teacher:
        examples, unreferenced = with_references(cfg, examples)
        _warn_unreferenced(unreferenced, unreferenced + len(examples), cfg)
    counter = _TokenCounter(cfg)
    if cfg.nll:
        _check_nll_room(cfg, counter, examples)
    console.info(
        f"scoring {', '.join(f'{r} {n}' for r, n in models.items())} on {len(examples):,} "
        f"prompts from {cfg.dataset} (greedy, max {decoding.max_new_tokens:,} new tokens, "
        f"from {decoding.source})"
    )
    sampling = Sampling(max_new_tokens=decoding.max_new_tokens, stop=decoding.stop)
    timings: dict[str, rp.Timing] = {role: rp.Timing() for role in models}
    references, ref_finish = _references(cfg, examples, sampling, counter, timings)
    if cfg.teacher:
        examples, references, ref_finish, unreferenced = _live_answered(
            cfg, examples, references, ref_finish
        )
    scored: list[str] = [role for role in ("student", "base") if role in models]
    scores = {
        role: _likelihood(cfg, role, models[role], examples, references, timings[role])
        for role in (scored if cfg.nll else [])
    }
    likelihoods = {role: nll for role, (nll, _) in scores.items()}
    answers = {
        role: [
            counter.answer(c)
            for c in _answer(cfg, role, models[role], examples, sampling, timings[role])
        ]
        for role in scored
    }

    gold = [ex.gold for ex in examples]
    summaries: dict[str, dict[str, Any]] = {
        "teacher": {
            "name": cfg.teacher or _teacher_name(meta),
            "source": "live" if cfg.teacher else f"column '{cfg.reference_column}'",
            "metrics": rp.teacher_summary(references, ref_finish, gold, cfg.answer_regex),
        }
    }
    for role in scored:
        total = None
        if role in likelihoods:
            total = (
                sum(s.nll for s in likelihoods[role]),
                sum(s.tokens for s in likelihoods[role]),
            )
        metrics = rp.summarize(answers[role], references, gold, cfg.answer_regex, total)
        metrics.update(scores[role][1] if role in scores else {})
        if cfg.on_policy_teacher:
            from openkd.eval import on_policy

            prompts = [ex.prompt for ex in examples]
            metrics.update(
                on_policy.score(cfg, role, models[role], prompts, decoding.max_new_tokens)
            )
        summaries[role] = {"name": models[role], "metrics": metrics}
    report = rp.build_report(
        cfg, examples, decoding, summaries, timings, counter.unit, fingerprint, started
    )
    report["rows_without_reference"] = unreferenced
    rows = rp.example_rows(examples, references, ref_finish, answers, likelihoods, cfg)
    rp.write_outputs(out_dir, report, rows)
    rp.print_table(report)
    _summary(report, timings, out_dir)
    console.stdout_line(str(report_path))


def _references(
    cfg: EvalConfig,
    examples: list[Example],
    sampling: Sampling,
    counter: _TokenCounter,
    timings: dict[str, rp.Timing],
) -> tuple[list[rp.Answer], list[str | None]]:
    """The teacher's answers: recorded in the dataset, or generated now by --teacher."""
    if not cfg.teacher:
        references = [counter.text(ex.reference or "") for ex in examples]
        return references, [ex.reference_finish for ex in examples]
    completions = _answer(cfg, "teacher", cfg.teacher, examples, sampling, timings["teacher"])
    return [counter.answer(c) for c in completions], [c.finish_reason for c in completions]


def _live_answered(
    cfg: EvalConfig,
    examples: list[Example],
    references: list[rp.Answer],
    finishes: list[str | None],
) -> tuple[list[Example], list[rp.Answer], list[str | None], int]:
    """The prompts the live teacher answered; a failed or empty answer is no reference."""
    keep = [i for i, r in enumerate(references) if r.error is None and has_reference(r.text)]
    if examples and not keep:
        first = next((r.error for r in references if r.error), None)
        cause = f" (first error: {first})" if first else ""
        raise OpenkdError(
            f"--teacher {cfg.teacher} answered none of the {len(examples):,} prompts{cause}; "
            "check the teacher and its backend, or score against --reference-column instead"
        )
    missing = len(examples) - len(keep)
    if missing:
        console.warn(
            f"the live teacher failed or answered nothing on {missing:,} of {len(examples):,} "
            "prompts; they are left out of every score (rows_without_reference in the report)"
        )
    return (
        [examples[i] for i in keep],
        [references[i] for i in keep],
        [finishes[i] for i in keep],
        missing,
    )


def _warn_unreferenced(missing: int, total: int, cfg: EvalConfig) -> None:
    if missing:
        console.warn(
            f"{missing:,} of {total:,} rows of {cfg.dataset} have an empty or missing reference "
            f"in column '{cfg.reference_column}'; they are left out of every score "
            "(rows_without_reference in the report)"
        )


# --- checks and cache ---------------------------------------------------------------------


def _check_output_dir(cfg: EvalConfig, out_dir: Path) -> None:
    """Before any model loads: --output-dir must be a directory, and none of the inputs, inside
    one, or the folder a dataset file is in (report.json and examples.jsonl go there)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OpenkdError(
            f"--output-dir {cfg.output_dir} is a file; pass a directory (report.json and "
            "examples.jsonl are written inside it)"
        )
    inputs = {"--student": cfg.student, "--base": cfg.base, "--teacher": cfg.teacher}
    refuse_input_as_output(
        out_dir,
        {**inputs, "--dataset": cfg.dataset},
        output_flag="--output-dir",
        written=lambda rel: rel.parts[0] in (rp.REPORT, rp.EXAMPLES),
    )
    if cfg.dataset and _dataset_folder(Path(os.path.expanduser(cfg.dataset))) == out_dir.resolve():
        raise ConfigError(
            f"--output-dir {cfg.output_dir} is the directory of --dataset {cfg.dataset}; eval "
            "never writes among its inputs: pass another --output-dir"
        )


def _dataset_folder(path: Path) -> Path | None:
    """The directory a local dataset file (or a glob's files) is in; None for the Hub."""
    if path.is_file():
        return path.parent.resolve()
    while any(ch in path.name for ch in "*?["):
        path = path.parent
        if path.is_dir():
            return path.resolve()
    return None


def _check_nll_room(cfg: EvalConfig, counter: _TokenCounter, examples: list[Example]) -> None:
    """Refuse an --nll-max-length that no prompt leaves room under for one answer token."""
    from openkd.eval.nll import shortest_prompt

    if counter.tokenizer is None:
        return
    shortest = shortest_prompt(
        counter.tokenizer, [ex.prompt for ex in examples], cfg.nll_max_length
    )
    if shortest is not None:
        raise ConfigError(
            f"--nll-max-length {cfg.nll_max_length} leaves no room for an answer token: the "
            f"shortest prompt is {shortest:,} tokens with the student's chat template, and "
            f"prompt + answer must fit; pass --nll-max-length {shortest + 1} or more (default "
            "4096), or --no-nll"
        )


def _check_models(cfg: EvalConfig) -> None:
    """A local model path that does not exist is a typo; say so before loading anything."""
    flags = {"student": "--student", "base": "--base", "teacher": "--teacher"}
    backends = cfg.backends()
    for role, flag in flags.items():
        name = getattr(cfg, role)
        backend = backends.get(role)
        local = backend in (*LOCAL_BACKENDS, "mock") or (backend == "openai" and cfg.serve)
        if name is not None and local:
            hint = " (has `openkd train` finished?)" if role == "student" else ""
            require_local_model(name, flag, hint)


def _reuse(report_path: Path, fingerprint: str) -> bool:
    previous = rp.read_report(report_path)
    if previous is None:
        return False
    if previous.get("fingerprint") != fingerprint:
        console.info(f"{report_path} was computed from other inputs; recomputing it")
        return False
    console.info(
        f"reusing {report_path}: same models, dataset and settings (pass --overwrite to recompute)"
    )
    rp.print_table(previous)
    console.stdout_line(str(report_path))
    return True


# --- the work -----------------------------------------------------------------------------


def _teacher_spec(cfg: EvalConfig, role: str, model: str, sampling: Sampling) -> TeacherSpec:
    """What `make_backend` needs to load `model` with the eval's engine settings."""
    from openkd.generate.backends.spec import TeacherSpec

    backend = cfg.backends()[role]
    values = {
        **cfg.engine_settings(),
        "teacher": model,
        "backend": backend,
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": 0.0,
    }
    if backend == "openai":
        values.update(base_url=None if cfg.serve else cfg.base_url, serve=cfg.serve)
        if cfg.serve:  # beside the report, not in generate's default outputs/
            values["server_log"] = Path(cfg.output_dir) / f"{role}.server.log"
    if backend != "vllm" and not (backend == "openai" and cfg.serve):
        values["vllm_args"] = {}  # this model's engine is not vLLM
    return TeacherSpec.model_validate(values)


def _answer(
    cfg: EvalConfig,
    role: str,
    model: str,
    examples: list[Example],
    sampling: Sampling,
    timing: rp.Timing,
) -> list[Completion]:
    """Every example answered by `model`, in order, through the configured backend."""
    from openkd.generate.backends import make_backend
    from openkd.generate.backends.base import answer_in_order
    from openkd.generate.progress import rows_and_tokens as bar

    spec = _teacher_spec(cfg, role, model, sampling)
    console.info(f"{role}: loading {model} ({spec.backend})")
    with make_backend(spec) as backend:
        t0 = time.monotonic()
        with bar(f"{role} answering", len(examples)) as advance:

            def landed(completion: Completion) -> None:
                timing.tokens += completion.completion_tokens
                advance(1, completion.completion_tokens)

            out = answer_in_order(backend, [ex.prompt for ex in examples], sampling, landed)
        timing.seconds = time.monotonic() - t0
        timing.versions = backend.versions()
    return out


def _likelihood(
    cfg: EvalConfig,
    role: str,
    model_name: str,
    examples: list[Example],
    refs: list[rp.Answer],
    timing: rp.Timing,
) -> tuple[list[Any], dict[str, Any]]:
    """Each teacher answer's NLL under `model_name`, teacher-forced (transformers); and, where
    the teacher's top-K log-probabilities are stored beside the dataset, the model's KL to them
    and top-1 agreement."""
    from openkd.eval.nll import score_answers
    from openkd.generate.backends.transformers import load_causal_lm
    from openkd.generate.progress import rows_and_tokens as bar

    console.info(f"{role}: likelihood of the teacher's answers ({model_name}, transformers)")
    model, tokenizer = load_causal_lm(
        model_name, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype
    )
    t0 = time.monotonic()
    soft: dict[str, Any] = {}
    try:
        with bar(f"{role} likelihood", len(examples)) as advance:
            scores = score_answers(
                model,
                tokenizer,
                [(ex.prompt, ref.text) for ex, ref in zip(examples, refs, strict=True)],
                batch_size=cfg.nll_batch_size,
                max_length=cfg.nll_max_length,
                on_batch=lambda n: advance(n, 0),
            )
        soft["nll_skipped"] = _count_unscored(cfg, role, scores)
        reader = _stored_logprobs(cfg)
        if reader is not None:
            from openkd.eval.kl import teacher_student_kl

            aligner = _cross_tokenizer(cfg, tokenizer)
            found = teacher_student_kl(
                model,
                tokenizer,
                (
                    {"id": ex.id, "prompt": ex.prompt, "answer": ref.text}
                    for ex, ref in zip(examples, refs, strict=True)
                ),
                reader,
                max_length=cfg.nll_max_length,
                batch_size=cfg.nll_batch_size,
                aligner=aligner,
            )
            soft.update(kl_to_teacher=found.kl, top1_agreement=found.top1_agreement)
            if found.coverage is not None:
                soft["kl_coverage"] = found.coverage
                console.info(
                    f"{role}: the teacher's tokenizer differs; KL to the teacher over the "
                    f"aligned positions, {found.coverage:.1%} of the answer tokens"
                )
    finally:
        del model
        free_memory()
    timing.nll_seconds = time.monotonic() - t0
    return scores, soft


def _cross_tokenizer(cfg: EvalConfig, tokenizer: Any) -> Any:
    """An aligner when the dataset's teacher tokenizes differently from `tokenizer`, else None."""
    from openkd.data.teacher import read_teacher
    from openkd.teacher.tokenizer import check_tokenizers

    teacher = read_teacher(cfg.dataset) if cfg.dataset else None
    if not teacher:
        return None
    _, _, teacher_tokenizer = check_tokenizers(
        tokenizer,
        teacher.get("name"),
        trust_remote_code=cfg.trust_remote_code,
        revision=teacher.get("revision"),
        cross="gold",
    )
    if teacher_tokenizer is None:
        return None
    from openkd.distill.crosstok.aligner import Aligner

    eos = tokenizer.eos_token_id
    return Aligner(teacher_tokenizer, tokenizer, "gold", int(eos if eos is not None else 0))


def _count_unscored(cfg: EvalConfig, role: str, scores: list[Any]) -> int:
    """Answers with no token inside --nll-max-length add nothing to the NLL: say how many."""
    skipped = sum(1 for s in scores if s.tokens == 0)
    if skipped:
        console.warn(
            f"{role}: {skipped:,} of {len(scores):,} teacher answers have no token within "
            f"--nll-max-length {cfg.nll_max_length} (the prompt fills it) and are left out of "
            "the NLL; pass a larger --nll-max-length to score them"
        )
    return skipped


def _stored_logprobs(cfg: EvalConfig) -> Any:
    """A reader of the teacher's top-K log-probabilities beside a local dataset, if any."""
    if cfg.dataset is None:
        return None
    path = Path(cfg.dataset).expanduser()
    sidecar = OutputFiles.of_file(path).logprobs if path.is_file() else None
    if sidecar is None or not sidecar.is_dir():
        return None
    from openkd.data.logprobs import SidecarReader

    return SidecarReader(sidecar)


class _TokenCounter:
    """Answer lengths in one tokenizer (the student's) for every model, so ratios compare like
    with like; falls back to characters when the student's tokenizer cannot be loaded."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.unit = "characters"
        self._tokenizer: Any = None
        try:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                model_path(cfg.student), trust_remote_code=cfg.trust_remote_code
            )
            self.unit = "student tokens"
        except (OSError, ValueError) as exc:
            console.warn(
                f"could not load the tokenizer of {cfg.student} ({type(exc).__name__}); "
                "answer lengths are counted in characters"
            )

    @property
    def tokenizer(self) -> Any:
        """The student's tokenizer, or None when it could not be loaded."""
        return self._tokenizer

    def count(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, text: str) -> rp.Answer:
        return rp.Answer(text=text, finish_reason=FINISH_STOP, tokens=self.count(text))

    def answer(self, completion: Completion) -> rp.Answer:
        text = completion.text or ""
        return rp.Answer(
            text=text,
            finish_reason=completion.finish_reason,
            tokens=self.count(text),
            error=completion.error,
        )


# --- outputs ------------------------------------------------------------------------------


def _teacher_name(meta: GenerateMeta | None) -> str:
    return str((meta.teacher.get("name") if meta else None) or "teacher (recorded)")


def _summary(report: dict[str, Any], timings: dict[str, rp.Timing], out_dir: Path) -> None:
    rows = [("prompts", console.fmt_int(report["rows"]))]
    for role, t in timings.items():
        rows.append((f"{role} answer tokens", console.fmt_int(t.tokens)))
        rate = t.tokens / t.seconds if t.seconds > 0 else 0.0
        rows.append((f"{role} tokens/s", console.fmt_rate(rate)))
    rows += [
        ("wall time", f"{report['wall_seconds']:,.1f} s"),
        ("report", str(out_dir / rp.REPORT)),
        ("per-example answers", str(out_dir / rp.EXAMPLES)),
    ]
    console.summary_table("openkd eval: done", rows)
