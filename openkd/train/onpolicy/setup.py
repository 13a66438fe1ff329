"""`openkd train --loss on-policy` around the trainer: the teacher pre-flight, building the
trainer, the check on the loaded student, and the lines of the summaries and the card."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.errors import OpenkdError, brief

if TYPE_CHECKING:
    from openkd.teacher.check import Teacher
    from openkd.teacher.served import Endpoint
    from openkd.train.config import TrainConfig
    from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer
    from openkd.train.prepare import Prepared

PREFLIGHT_STEPS = 3


@dataclass(frozen=True)
class OnPolicy:
    """What an on-policy run checked before the weights load."""

    teacher: Teacher
    server: Endpoint | None = None  # a served teacher (--teacher-base-url, --teacher-serve)
    served_model: str | None = None  # the model name the server answers to


def prepare_teacher(
    cfg: TrainConfig, tokenizer: Any, student: str, managed: Endpoint | None = None
) -> OnPolicy:
    """Pre-flight 2/3: which method fits the teacher (one vocabulary, or GOLD across
    tokenizers); a served teacher's server answers and serves it (`managed`: --teacher-serve's
    server)."""
    from openkd.teacher.check import check_teacher

    assert cfg.teacher is not None  # the config requires it
    teacher = check_teacher(
        cfg.teacher,
        student,
        tokenizer,
        trust_remote_code=cfg.trust_remote_code,
        cross=cfg.cross_tokenizer or "auto",
        served=cfg.served_teacher,
    )
    lines, warnings = list(teacher.lines), list[str]()
    server = served_model = None
    if cfg.served_teacher:
        from openkd.teacher.served import probe
        from openkd.train.onpolicy.served import endpoint

        server = endpoint(cfg, managed)
        served_model, ok, warnings = probe(server, cfg.teacher)
        lines += ok
    console.info(f"[bold]pre-flight 2/{PREFLIGHT_STEPS}[/]: the teacher (--loss on-policy)")
    for line in lines:
        console.info(f"  [green]✓[/] {line}")
    for warning in warnings:
        console.warn(warning)
    return OnPolicy(teacher=teacher, server=server, served_model=served_model)


def build_on_policy_trainer(prepared: Prepared) -> OpenkdOnPolicyTrainer:
    """TRL loads the student and the teacher; the trainer samples, scores, trains."""
    from openkd.train.arguments import lora_config
    from openkd.train.launch import distributed_training_kwargs
    from openkd.train.onpolicy.arguments import distillation_kwargs, make_distillation_config
    from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer
    from openkd.train.prepare import _has_cuda
    from openkd.train.trainer import use_console_output

    cfg, on_policy = prepared.cfg, prepared.on_policy
    assert on_policy is not None
    if on_policy.teacher.method != "same":
        return _build_gold_trainer(prepared)
    cuda, bf16_gpu = _has_cuda()
    kwargs = distillation_kwargs(
        cfg, cuda=cuda, bf16_gpu=bf16_gpu, has_eval=prepared.data.eval is not None
    )
    kwargs.update(distributed_training_kwargs(cfg))
    server = on_policy.server
    args = make_distillation_config(kwargs, server.url if server else None)
    tokenizer = prepared.tokenizer
    if cfg.eos_token is not None:
        tokenizer.eos_token = cfg.eos_token  # TRL then stops sampling at it too
    teacher: dict[str, Any] = {"teacher_model": on_policy.teacher.path}
    if on_policy.teacher.teacher_vocab_size not in (0, on_policy.teacher.vocab_size):
        from openkd.train.onpolicy.teacher import load_resized_teacher

        # One tokenizer, heads padded differently: TRL needs equal head sizes.
        try:
            teacher = {
                "teacher_model": load_resized_teacher(
                    on_policy.teacher.path, args, on_policy.teacher.vocab_size
                )
            }
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: shapes mismatch
            raise OpenkdError(
                f"--teacher {cfg.teacher}: could not load its weights ({brief(exc)}); check the "
                "path or id"
            ) from exc
    trainer_class: type[OpenkdOnPolicyTrainer] = OpenkdOnPolicyTrainer
    if server is not None:
        from openkd.teacher.client import TeacherClient
        from openkd.train.onpolicy.served import describe_failure
        from openkd.train.onpolicy.served_trainer import OpenkdServedTrainer

        assert on_policy.served_model is not None
        teacher = {
            "teacher_client": TeacherClient(
                server,
                on_policy.served_model,
                on_failure=lambda exc: describe_failure(server, exc, cfg.output_dir),
            )
        }
        trainer_class = OpenkdServedTrainer
    try:
        trainer = trainer_class(
            model=prepared.student,
            **teacher,
            args=args,
            train_dataset=prepared.data.train,
            eval_dataset=prepared.data.eval,
            processing_class=tokenizer,
            peft_config=lora_config(cfg) if cfg.lora else None,
            eos_id=prepared.eot.token_id,
            samples_per_prompt=cfg.samples_per_prompt,
            lmbda=cfg.lmbda,
            max_length=cfg.max_length,
        )
    except OSError as exc:
        which = "--teacher" if on_policy.teacher.path in str(exc) else "--student"
        name = cfg.teacher if which == "--teacher" else cfg.student
        raise OpenkdError(
            f"{which} {name}: could not load its weights ({brief(exc)}); check the path or id"
        ) from exc
    except ValueError as exc:  # TRL's own checks of settings it cannot combine
        raise OpenkdError(f"TRL refused these settings: {brief(exc)}") from exc
    if cfg.eos_token is not None:
        _set_eos(trainer.model, tokenizer.eos_token_id)
    use_console_output(trainer)
    return trainer


def _build_gold_trainer(prepared: Prepared) -> Any:
    """Across tokenizers: TRL's GOLD trainer (`openkd.train.onpolicy.gold`)."""
    from transformers import AutoTokenizer

    from openkd.train.arguments import build_trl_config, lora_config
    from openkd.train.launch import distributed_training_kwargs
    from openkd.train.onpolicy.arguments import distillation_kwargs
    from openkd.train.onpolicy.gold import OpenkdGoldTrainer, _gold, byte_level, gold_kwargs
    from openkd.train.prepare import _has_cuda
    from openkd.train.trainer import use_console_output

    cfg, on_policy = prepared.cfg, prepared.on_policy
    assert on_policy is not None
    teacher = on_policy.teacher
    cuda, bf16_gpu = _has_cuda()
    data = prepared.data
    # GOLD evaluates off-policy, on the dataset's answers: prompt-only rows have none.
    held_out = data.eval if data.eval is not None and cfg.lmbda < 1.0 else None
    base = distillation_kwargs(cfg, cuda=cuda, bf16_gpu=bf16_gpu, has_eval=held_out is not None)
    base.update(distributed_training_kwargs(cfg))
    tokenizer = prepared.tokenizer
    if cfg.eos_token is not None:
        tokenizer.eos_token = cfg.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher_tokenizer = AutoTokenizer.from_pretrained(
        teacher.path, trust_remote_code=cfg.trust_remote_code
    )
    facts = {"path": teacher.path, "byte_level": byte_level(teacher_tokenizer, tokenizer)}
    config_class, _ = _gold()
    args = build_trl_config(config_class, gold_kwargs(cfg, base, teacher.method, facts))
    try:
        trainer = OpenkdGoldTrainer(
            model=prepared.student,
            teacher_model=teacher.path,
            args=args,
            train_dataset=data.train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=lora_config(cfg) if cfg.lora else None,
            eos_id=prepared.eot.token_id,
            samples_per_prompt=cfg.samples_per_prompt,
            lmbda=cfg.lmbda,
            max_length=cfg.max_length,
            method=teacher.method,
        )
    except OSError as exc:
        raise OpenkdError(
            f"--teacher {cfg.teacher}: could not load its weights ({brief(exc)}); check the "
            "path or id"
        ) from exc
    except ValueError as exc:
        raise OpenkdError(f"TRL's GOLD trainer refused these settings: {brief(exc)}") from exc
    trainer.generation_config.eos_token_id = prepared.eot.token_id
    if cfg.eos_token is not None:
        _set_eos(trainer.model, tokenizer.eos_token_id)
    use_console_output(trainer)
    return trainer


def _set_eos(model: Any, eos_id: int) -> None:
    """--eos-token on the saved student, as TRL's SFTTrainer sets it for hard labels."""
    model.config.get_text_config().eos_token_id = eos_id
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if eos_id not in ids:
        model.generation_config.eos_token_id = [eos_id, *ids]


def check_on_policy_example(prepared: Prepared, trainer: OpenkdOnPolicyTrainer) -> None:
    """EOS agreement on the loaded student, then what the loss covers, on the first prompt."""
    from rich.panel import Panel
    from rich.text import Text

    from openkd.train.preflight import check_eos

    model: Any = trainer.model
    check_eos(
        trainer.processing_class,
        prepared.template,
        model_eos=model.config.get_text_config().eos_token_id,
        generation_eos=model.generation_config.eos_token_id,
    )
    row = prepared.preflight_row
    tokenizer: Any = trainer.processing_class
    rendered = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=False
    )
    eot = prepared.eot
    cfg = prepared.cfg
    console.info(
        f"[bold]pre-flight {PREFLIGHT_STEPS}/{PREFLIGHT_STEPS}[/]: what the student sees and "
        "what carries loss, on the first prompt"
    )
    text = Text(rendered, style="dim")
    text.append("⟦the student's sample ... " + eot.token + "⟧", style="bold black on green")
    console.console.print(Panel(text, expand=False))
    console.info(
        f"  [green]✓[/] the student samples up to {cfg.completion_tokens} tokens and stops at "
        f"{eot.token!r} (id {eot.token_id}); the loss covers every sampled token up to and "
        "including it, none of the prompt"
    )
    teacher = prepared.on_policy.teacher if prepared.on_policy is not None else None
    if teacher is not None and teacher.method != "same":
        console.info(f"  [green]✓[/] {_alignment_line(prepared, trainer)}")


def _alignment_line(prepared: Prepared, trainer: Any) -> str:
    """GOLD's grouping of the two tokenizations on the first rows' answers (or prompts)."""
    from openkd.train.onpolicy.gold import PREFLIGHT_ROWS, alignment, describe_alignment

    train = prepared.data.train
    rows = train.select(range(min(PREFLIGHT_ROWS, len(train))))
    answers = ["".join(m.get("content") or "" for m in row.get("completion") or []) for row in rows]
    what = "dataset answers"
    if not any(answers):
        answers = ["".join(m.get("content") or "" for m in row["prompt"]) for row in rows]
        what = "prompts (no answers read: the student's samples are unknown before training)"
    if not trainer.args.use_extended_uld:
        return "alignment by position (a tokenizer is not byte-level): not measured"
    counts = alignment(trainer.teacher_tokenizer, trainer.processing_class, answers)
    return describe_alignment(counts, len(rows), what)


def loss_description(cfg: TrainConfig, method: str | None = None) -> str:
    """The on-policy objective in words, for the summary and the model card; `method` "gold"
    or "uld" across tokenizers."""
    beta = cfg.beta
    if method in ("gold", "uld"):
        how = (
            f"GOLD hybrid: generalized JSD (beta={beta:g}) over the tokens both vocabularies "
            "share, ULD sorted-probability L1 over the rest"
            if method == "gold"
            else "ULD: sorted-probability L1 over the whole vocabularies"
        )
        text = (
            f"on-policy across tokenizers ({method}): {how}, per text-aligned span of the "
            f"student's own samples, T={cfg.temperature:g} (TRL experimental GOLDTrainer)"
        )
        if cfg.lmbda < 1.0:
            text += (
                f"; {1 - cfg.lmbda:.0%} of steps on the dataset's answers (lambda {cfg.lmbda:g})"
            )
        return text
    what = (
        "reverse KL(student ‖ teacher)"
        if beta == 1.0
        else "forward KL(teacher ‖ student)"
        if beta == 0.0
        else f"generalized JSD, beta={beta:g}"
    )
    text = (
        f"on-policy: {what} per token on the student's own samples, T={cfg.temperature:g} "
        f"(TRL DistillationTrainer)"
    )
    if cfg.served_teacher:  # TRL's supports: the server gives a few tokens' log-probabilities
        support = (
            "the sampled token"
            if beta == 1.0
            else "the teacher's top token"
            if beta == 0.0
            else "the sampled token (reverse term) and the teacher's top token (forward term)"
        )
        text = (
            f"on-policy: {what} per token on the student's own samples, T={cfg.temperature:g}, "
            f"over {support} plus a tail bucket (served teacher; TRL ServerDistillationTrainer)"
        )
    if cfg.lmbda < 1.0:
        text += (
            f"; {1 - cfg.lmbda:.0%} of steps on the dataset's answers (GKD lambda {cfg.lmbda:g})"
        )
    return text


def start_rows(prepared: Prepared, trainer: Any) -> list[tuple[str, str]]:
    """Rows of the start summary that differ from the hard-label ones."""
    cfg = prepared.cfg
    fmt = console.fmt_int
    rows = [("prompts read", fmt(prepared.data.filtered.rows))]
    stats = trainer.prepared.get("train")
    if stats is not None:
        rows.append(("train prompts", fmt(stats.examples)))
        if stats.rows_in != stats.examples:
            rows.append(
                (
                    "dropped: prompt > --max-length - --max-completion-length",
                    fmt(stats.rows_in - stats.examples),
                )
            )
    eval_stats = trainer.prepared.get("eval")
    if eval_stats is not None:
        rows.append(("eval prompts", fmt(eval_stats.examples)))
    rows += [
        ("teacher placement", teacher_placement(trainer)),
        ("loss", loss_description(cfg, getattr(trainer, "method", None))),
        (
            "student sampling",
            f"{cfg.samples_per_prompt} per prompt, temperature "
            f"{cfg.sampling_temperature or 1.0:g}, top-p {cfg.sampling_top_p or 1.0:g}, "
            f"up to {cfg.completion_tokens} tokens"
            + (" (vLLM)" if trainer.use_vllm else " (transformers generate)"),
        ),
    ]
    if getattr(trainer, "method", None) in ("gold", "uld"):
        rows.append(
            (
                "cross-tokenizer",
                f"{trainer.method} (TRL GOLDTrainer); not kept from openkd's on-policy trainer: "
                "the exact reverse-KL metric and the teacher's time share (no id-by-id KL "
                "across vocabularies), the replayable per-step --kd-lambda draw"
                + (
                    ", evaluation (GOLD evaluates on the dataset's answers; none are read "
                    "at --kd-lambda 1)"
                    if prepared.data.eval is not None and trainer.eval_dataset is None
                    else ""
                ),
            )
        )
    return rows


def _kind(results: dict[str, Any]) -> str:
    """The suffix ", top-1+tail estimate" for a served teacher's reverse KL; nothing when exact."""
    kind = results.get("reverse_kl_kind") or "exact"
    return "" if kind == "exact" else f", {kind}"


def end_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the end summary: the reverse KL at start and end, where the step time went."""
    rows = []
    start, end = results.get("reverse_kl_start"), results.get("reverse_kl_end")
    if start is not None and end is not None:
        rows.append(
            (
                "reverse KL per token (own samples)",
                f"{start:.4f} (step {results['reverse_kl_start_step']}) -> {end:.4f} "
                f"(step {results['reverse_kl_end_step']}){_kind(results)}",
            )
        )
    if results.get("score_share") is not None:
        rows.append(
            (
                "step time: sampling / teacher",
                f"{results['generate_share']:.0%} / {results['score_share']:.0%}",
            )
        )
    return rows


def card_fields(cfg: TrainConfig, results: dict[str, Any]) -> dict[str, Any]:
    """CardInfo fields of an on-policy student: the method and the teacher, the reverse KL."""
    cross = results.get("cross_tokenizer_method")
    method = (
        "on-policy distillation: the student sampled its own answers to the dataset's prompts "
        f"and learned the teacher's per-token distribution on them "
        f"({loss_description(cfg, cross)})."
    )
    lines = []
    start, end = results.get("reverse_kl_start"), results.get("reverse_kl_end")
    if start is not None and end is not None:
        lines.append(
            f"Per-token reverse KL(student ‖ teacher) on the student's own samples"
            f"{_kind(results)}: {start:.4f} "
            f"at step {results['reverse_kl_start_step']}, {end:.4f} at step "
            f"{results['reverse_kl_end_step']}"
        )
    return {
        "method": method,
        "extra_tags": ("on-policy-distillation", "gold")
        if cross
        else ("on-policy-distillation", "distillation-trainer"),
        "extra_results": tuple(lines),
    }


def teacher_placement(trainer: Any) -> str:
    """Where TRL put the teacher: a vLLM server, sharded by ZeRO-3, or a copy in each process."""
    client = getattr(trainer, "teacher_client", None)
    if client is not None:
        how = "started by openkd, " if client.point.managed else ""
        return f"vLLM server at {client.base_url} ({how}serves {client.model}), scoring by HTTP"
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    processes = trainer.accelerator.num_processes
    first = next(teacher.parameters())
    if hasattr(first, "ds_id"):  # a ZeRO-3 partitioned parameter
        return (
            f"DeepSpeed ZeRO-3 inference engine, parameters sharded over {processes} "
            "process(es) and gathered layer by layer for its forward pass"
        )
    where = str(first.device)
    if processes > 1:
        return f"a full copy in each of {processes} processes ({where}), inference only"
    return f"{where}, inference only ({first.dtype})".replace("torch.", "")
