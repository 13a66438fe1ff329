"""`openkd train` before the first step: every check that needs no weights, then the trainer.

`prepare` validates settings, data, chat template, EOS and prompt lengths and claims the output
directory; `build_trainer` has TRL load the student; `check_prepared_example` shows the loss
mask of a real example, so a wrong mask is seen before any GPU hour is spent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.errors import OpenkdError, brief
from openkd.train.config import TrainConfig
from openkd.train.data import TrainData

if TYPE_CHECKING:
    from openkd.chat import EndOfTurn
    from openkd.teacher.served import Endpoint
    from openkd.train.onpolicy.setup import OnPolicy
    from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer
    from openkd.train.soft import SoftLabels
    from openkd.train.trainer import OpenkdSFTTrainer


@dataclasses.dataclass
class Prepared:
    """Everything checked before the student's weights are loaded."""

    cfg: TrainConfig
    student: str
    data: TrainData
    tokenizer: Any
    template: str
    eot: EndOfTurn
    preflight_row: dict[str, Any]  # first row whose prompt fits --max-length
    identity: dict[str, Any]
    resume_from: Path | None
    soft: SoftLabels | None = None  # --loss soft|mix: the teacher's log-probabilities
    on_policy: OnPolicy | None = None  # --loss on-policy: the teacher that scores


def _has_cuda() -> tuple[bool, bool]:
    import torch

    cuda = torch.cuda.is_available()
    return cuda, bool(cuda and torch.cuda.is_bf16_supported())


def prepare(cfg: TrainConfig, student: str, teacher_server: Endpoint | None = None) -> Prepared:
    """Checks that need no weights: settings, data, template and EOS, lengths, output dir."""
    from openkd.chat import template_text
    from openkd.train.arguments import check_report_to, check_sft_args, sft_fields
    from openkd.train.checkpoints import find_resume_checkpoint
    from openkd.train.data import load_train_data
    from openkd.train.preflight import check_eos, check_prompts_fit, prompt_length
    from openkd.train.runinfo import check_output_dir, clear_output_dir, identity, write_run
    from openkd.train.student import load_eos_settings, load_tokenizer

    if cfg.on_policy:
        from openkd.train.onpolicy.arguments import check_distillation_args

        check_distillation_args(cfg.sft_args, served=cfg.served_teacher)
    else:
        check_sft_args(cfg.sft_args, sft_fields())
    check_report_to(cfg.report_to)
    data = (
        _load_data(cfg)
        if cfg.on_policy
        else load_train_data(
            cfg.dataset,
            eval_dataset=cfg.eval_dataset,
            eval_fraction=cfg.eval_fraction,
            keep_truncated=cfg.keep_truncated,
            max_samples=cfg.max_samples,
            seed=cfg.seed,
            keep_ids=cfg.soft_labels,
        )
    )
    tokenizer = load_tokenizer(
        student, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template
    )
    template = template_text(tokenizer) or ""
    eos = load_eos_settings(student, trust_remote_code=cfg.trust_remote_code)
    eot, eos_lines = check_eos(
        tokenizer,
        template,
        model_eos=eos.model_eos,
        generation_eos=eos.generation_eos,
        eos_token=cfg.eos_token,
    )
    steps = 3 if cfg.soft_labels or cfg.on_policy else 2
    console.info(f"[bold]pre-flight 1/{steps}[/]: chat template and EOS")
    if cfg.chat_template:
        console.info(f"  chat template from {cfg.chat_template} (saved with the student)")
    for line in eos_lines:
        console.info(f"  [green]✓[/] {line}")
    if eot.trailing:
        console.info(
            f"  [green]✓[/] the template writes {eot.trailing!r} after {eot.token!r} at the end "
            "of a conversation; openkd drops it from every example, so each ends at EOS"
        )
    soft = None
    if cfg.soft_labels:
        from openkd.train.soft import prepare_soft_labels

        soft = prepare_soft_labels(cfg, data, tokenizer, student)
        console.info(
            f"[bold]pre-flight 2/3[/]: the teacher's log-probabilities (--loss {cfg.loss})"
        )
        for line in soft.lines:
            console.info(f"  [green]✓[/] {line}")
        for warning in soft.warnings:
            console.warn(warning)
    on_policy = None
    if cfg.on_policy:
        from openkd.train.onpolicy.setup import prepare_teacher

        on_policy = prepare_teacher(cfg, tokenizer, student, teacher_server)
    prompts = (row["prompt"] for row in data.train.select_columns(["prompt"]))
    first_fit = check_prompts_fit(
        (prompt_length(tokenizer, template, p) for p in prompts), cfg.max_length
    )

    ident = identity(cfg, student=student, dataset_fingerprint=data.fingerprint, template=template)
    if soft is not None:  # other teacher data would make the checkpoints another run's
        ident["settings"]["kd_top_k"] = soft.k
        if soft.coverage is not None:  # targets on the student's tokens, by this method
            ident["settings"]["cross_tokenizer"] = soft.coverage.method
    if on_policy is not None:  # another teacher or sampling makes them another run's too
        from openkd.train.onpolicy.teacher import identity_settings

        ident["settings"].update(identity_settings(cfg, on_policy.teacher))
    main = console.is_main_process()
    check_output_dir(cfg.output_dir, ident, overwrite=cfg.overwrite)
    if cfg.overwrite and main:
        clear_output_dir(cfg.output_dir)  # names what it removes first
    if main:
        write_run(cfg.output_dir, ident, status="running")
    resume_from = (
        None
        if cfg.overwrite
        else find_resume_checkpoint(
            cfg.output_dir, cfg.resume, max_steps=cfg.max_steps, epochs=cfg.epochs
        )
    )
    return Prepared(
        cfg=cfg,
        student=student,
        data=data,
        tokenizer=tokenizer,
        template=template,
        eot=eot,
        preflight_row=data.train[first_fit],
        identity=ident,
        resume_from=resume_from,
        soft=soft,
        on_policy=on_policy,
    )


def _load_data(cfg: TrainConfig) -> TrainData:
    from openkd.train.onpolicy.data import load_prompt_data

    return load_prompt_data(cfg)


def build_trainer(prepared: Prepared) -> OpenkdSFTTrainer | OpenkdOnPolicyTrainer:
    """TRL loads the student (`from_pretrained` on its path) and prepares the data."""
    from openkd.train.arguments import lora_config, make_sft_config, sft_kwargs
    from openkd.train.launch import distributed_training_kwargs
    from openkd.train.trainer import OpenkdKDTrainer, OpenkdSFTTrainer, use_console_output

    cfg = prepared.cfg
    if prepared.on_policy is not None:
        from openkd.train.onpolicy.setup import build_on_policy_trainer

        return build_on_policy_trainer(prepared)
    cuda, bf16_gpu = _has_cuda()
    kwargs = sft_kwargs(cfg, cuda=cuda, bf16_gpu=bf16_gpu, has_eval=prepared.data.eval is not None)
    kwargs.update(distributed_training_kwargs(cfg))
    args = make_sft_config(kwargs)
    if cfg.packing:
        _explain_packing(args, cuda)
    extra: dict[str, Any] = {}
    trainer_class: type[OpenkdSFTTrainer] = OpenkdSFTTrainer
    if prepared.soft is not None:
        trainer_class = OpenkdKDTrainer
        extra = {"soft": prepared.soft, "alpha": cfg.alpha, "temperature": cfg.temperature}
    try:
        trainer = trainer_class(
            model=prepared.student,
            args=args,
            train_dataset=prepared.data.train,
            eval_dataset=prepared.data.eval,
            processing_class=prepared.tokenizer,
            peft_config=lora_config(cfg) if cfg.lora else None,
            eos_id=prepared.eot.token_id,
            trim_after_eos=bool(prepared.eot.trailing),
            **extra,
        )
    except OSError as exc:
        raise OpenkdError(
            f"--student {cfg.student}: could not load its weights ({brief(exc)}); check "
            "the path or id"
        ) from exc
    except ValueError as exc:  # TRL's own checks of settings it cannot combine
        raise OpenkdError(f"TRL refused these settings: {brief(exc)}") from exc
    use_console_output(trainer)
    return trainer


def _explain_packing(args: Any, cuda: bool) -> None:
    attn = ((args.model_init_kwargs or {}) if isinstance(args.model_init_kwargs, dict) else {}).get(
        "attn_implementation"
    )
    if attn and "flash" in str(attn):
        return
    where = (
        "flash-attention does not run on CPU"
        if not cuda
        else "without flash-attention (install flash-attn and set sft_args.model_init_kwargs."
        "attn_implementation: flash_attention_2)"
    )
    console.info(
        f"--packing: TRL's bfd packing trains padding-free; {where}, so transformers keeps packed "
        "examples apart with a block-diagonal mask built from position_ids (correct, but it "
        "uses memory quadratic in --max-length)"
    )


def check_prepared_example(prepared: Prepared, trainer: Any) -> None:
    """Pre-flight: EOS agreement on the loaded student, then the loss mask of a real example."""
    from rich.panel import Panel

    if prepared.on_policy is not None:
        from openkd.train.onpolicy.setup import check_on_policy_example

        check_on_policy_example(prepared, trainer)
        return

    from openkd.train.preflight import check_eos, check_loss_mask, loss_segments, marked_text

    model: Any = trainer.model
    # TRL applied --eos-token and the pad token to the loaded model; check what will be saved.
    check_eos(
        trainer.processing_class,
        prepared.template,
        model_eos=model.config.get_text_config().eos_token_id,
        generation_eos=model.generation_config.eos_token_id,
    )

    row = prepared.preflight_row
    example = trainer.prepare_one(row)
    if example is None:
        raise OpenkdError(
            "the first training example whose prompt fits --max-length lost all its answer "
            "tokens in preparation; raise --max-length"
        )
    answer = "".join(m["content"] for m in row["completion"])
    if prepared.soft is not None:
        from openkd.train.soft import answer_text

        answer = answer_text(
            trainer.processing_class,
            prepared.soft.reader,
            row,
            prepared.eot.token_id,
            prepared.soft.aligner,
        )
    report = check_loss_mask(
        trainer.processing_class,
        example,
        answer=answer,
        prompt=row["prompt"],
        eos_id=prepared.eot.token_id,
    )
    segments = loss_segments(trainer.processing_class, example["input_ids"], example["labels"])
    steps = 3 if prepared.soft is not None else 2
    console.info(
        f"[bold]pre-flight {steps}/{steps}[/]: loss mask of a training example (trained part "
        "highlighted)"
    )
    console.console.print(
        Panel(marked_text(segments, markers=not console.console.is_terminal), expand=False)
    )
    console.info(
        f"  [green]✓[/] {report.trained_tokens} of {report.total_tokens} tokens carry loss: the "
        f"teacher's answer and {prepared.eot.token!r}, none of the prompt"
        + (
            ""
            if prepared.soft is None
            else " (the answer is the student's tokens of the teacher's text)"
            if prepared.soft.aligner is not None
            else " (the answer is the teacher's own token ids)"
        )
    )
    if report.extra_text.strip():
        console.info(
            f"  note: the template adds {report.extra_text.strip()!r} to the answer; it is "
            "trained too"
        )
