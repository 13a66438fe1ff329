"""`openkd train --loss on-policy` around the trainer: the teacher pre-flight, building the
trainer, the check on the loaded student, and the lines of the summaries and the card."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.errors import OpenkdError, brief

if TYPE_CHECKING:
    from openkd.train.config import TrainConfig
    from openkd.train.onpolicy.teacher import Teacher
    from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer
    from openkd.train.prepare import Prepared

PREFLIGHT_STEPS = 3


@dataclass(frozen=True)
class OnPolicy:
    """What an on-policy run checked before the weights load."""

    teacher: Teacher


def prepare_teacher(cfg: TrainConfig, tokenizer: Any, student: str) -> OnPolicy:
    """Pre-flight 2/2: the teacher shares the student's vocabulary (tokenizer and head size)."""
    from openkd.train.onpolicy.teacher import check_teacher

    assert cfg.teacher is not None  # the config requires it
    teacher = check_teacher(
        cfg.teacher, student, tokenizer, trust_remote_code=cfg.trust_remote_code
    )
    console.info(f"[bold]pre-flight 2/{PREFLIGHT_STEPS}[/]: the teacher (--loss on-policy)")
    for line in teacher.lines:
        console.info(f"  [green]✓[/] {line}")
    return OnPolicy(teacher=teacher)


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
    cuda, bf16_gpu = _has_cuda()
    kwargs = distillation_kwargs(
        cfg, cuda=cuda, bf16_gpu=bf16_gpu, has_eval=prepared.data.eval is not None
    )
    kwargs.update(distributed_training_kwargs(cfg))
    args = make_distillation_config(kwargs)
    tokenizer = prepared.tokenizer
    if cfg.eos_token is not None:
        tokenizer.eos_token = cfg.eos_token  # TRL then stops sampling at it too
    try:
        trainer = OpenkdOnPolicyTrainer(
            model=prepared.student,
            teacher_model=on_policy.teacher.path,
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


def loss_description(cfg: TrainConfig) -> str:
    """The on-policy objective in words, for the summary and the model card."""
    beta = cfg.beta
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
        ("loss", loss_description(cfg)),
        (
            "student sampling",
            f"{cfg.samples_per_prompt} per prompt, temperature "
            f"{cfg.sampling_temperature or 1.0:g}, top-p {cfg.sampling_top_p or 1.0:g}, "
            f"up to {cfg.completion_tokens} tokens"
            + (" (vLLM)" if trainer.use_vllm else " (transformers generate)"),
        ),
    ]
    return rows


def end_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the end summary: the reverse KL at start and end, where the step time went."""
    rows = []
    start, end = results.get("reverse_kl_start"), results.get("reverse_kl_end")
    if start is not None and end is not None:
        rows.append(
            (
                "reverse KL per token (own samples)",
                f"{start:.4f} (step {results['reverse_kl_start_step']}) -> {end:.4f} "
                f"(step {results['reverse_kl_end_step']})",
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
    method = (
        "on-policy distillation: the student sampled its own answers to the dataset's prompts "
        f"and learned the teacher's per-token distribution on them ({loss_description(cfg)})."
    )
    lines = []
    start, end = results.get("reverse_kl_start"), results.get("reverse_kl_end")
    if start is not None and end is not None:
        lines.append(
            f"Per-token reverse KL(student ‖ teacher) on the student's own samples: {start:.4f} "
            f"at step {results['reverse_kl_start_step']}, {end:.4f} at step "
            f"{results['reverse_kl_end_step']}"
        )
    return {
        "method": method,
        "extra_tags": ("on-policy-distillation", "distillation-trainer"),
        "extra_results": tuple(lines),
    }


def teacher_placement(trainer: Any) -> str:
    """Where TRL put the teacher: sharded by ZeRO-3, or a copy in each process."""
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
