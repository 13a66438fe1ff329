"""`openkd train`: fine-tune a student on a teacher's answers with TRL SFT.

Order matters: cheap checks (paths), then the multi-process relaunch, then everything that
can fail without loading weights (SFT settings, dataset, tokenizer, chat template and EOS,
prompt lengths, the output directory's run), then TRL loads the student and prepares the
data, the pre-flight checks run on a prepared example, and training starts. The final student
(weights, tokenizer, template, generation_config, card, resolved config) goes to
`--output-dir`; its path is the only thing printed on stdout.

Under `accelerate launch` every process runs this; only rank 0 prints, writes the run record,
card and merged model, and pushes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from openkd import console
from openkd.config import save_resolved
from openkd.data.sources import require_source
from openkd.errors import OpenkdError, brief
from openkd.system import library_versions
from openkd.train.checkpoints import check_resume_exists
from openkd.train.config import TrainConfig
from openkd.train.data import TrainData
from openkd.train.runinfo import check_output_dir_usable
from openkd.train.student import read_template_file, resolve_student

if TYPE_CHECKING:
    from openkd.train.preflight import EndOfTurn
    from openkd.train.soft import SoftLabels
    from openkd.train.trainer import OpenkdSFTTrainer, RunMeter

RESOLVED_CONFIG = "openkd_train.yaml"
MERGED_DIR = "merged"


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


def run(cfg: TrainConfig) -> None:
    started = time.monotonic()
    student = resolve_student(cfg.student)
    require_source(cfg.dataset, "--dataset")
    if cfg.eval_dataset:
        require_source(cfg.eval_dataset, "--eval-dataset")
    if cfg.chat_template:
        read_template_file(cfg.chat_template)
    check_output_dir_usable(cfg.output_dir)
    if not cfg.overwrite:
        check_resume_exists(cfg.resume)

    from openkd.train.launch import relaunch_if_needed

    launching = bool(cfg.accelerate_config or cfg.deepspeed or cfg.num_processes)
    if launching and relaunch_if_needed(cfg, _launch_argv(cfg)):
        return
    with _stdout_to_stderr():
        final_dir = train(cfg, student, started)
    if final_dir is not None:
        console.stdout_line(str(final_dir))


def train(cfg: TrainConfig, student: str, started: float) -> Path | None:
    """The training run in this process; the final student's folder (None off rank 0)."""
    from openkd.train.runinfo import write_run
    from openkd.train.trainer import RunMeter, StopWhenComplete, TrainingAlreadyComplete

    prepared = prepare(cfg, student)
    trainer = build_trainer(prepared)
    check_prepared_example(prepared, trainer)
    _start_summary(prepared, trainer)
    meter = RunMeter()
    trainer.add_callback(meter)
    trainer.add_callback(StopWhenComplete())
    try:
        trainer.train(
            resume_from_checkpoint=str(prepared.resume_from) if prepared.resume_from else None
        )
    except TrainingAlreadyComplete as done:
        # Close the progress bar and let trackers finish, as a normal end of training does.
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        _say(f"training is complete ({done}); saving the student again")
    final_dir = save_student(prepared, trainer)
    if not console.is_main_process():
        return None
    results = _results(trainer, meter)
    _write_cards(prepared, trainer, results)
    write_run(cfg.output_dir, prepared.identity, status="complete", results=results)
    if cfg.push_to_hub:
        from openkd.train.hub import push_folder

        url = push_folder(
            final_dir,
            cfg.push_to_hub,
            private=cfg.private,
            retry="rerun the same command: training is complete and is not repeated, the "
            f"push is retried (or run `hf upload {cfg.push_to_hub} {final_dir}`)",
        )
        _say(f"pushed to {url}")
    _end_summary(prepared, results, final_dir, time.monotonic() - started)
    return final_dir


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything printed while training to stderr, C-level writes included.

    Libraries print to stdout (DeepSpeed's logger, PEFT, tracker clients); openkd keeps stdout
    for the final model path, so `MODEL=$(openkd train ...)` captures exactly that.
    """
    sys.stdout.flush()
    try:
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable fd 1 or 2 (a daemon): Python-level redirect only
        saved_fd = None
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stdout = saved
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _say(message: str) -> None:
    """An info line, unwrapped: logs of long runs are read in files and grepped."""
    console.console.print(message, soft_wrap=True)


def _launch_argv(cfg: TrainConfig) -> list[str]:
    """The arguments the launched workers get: this command's, or the resolved config."""
    if sys.argv[1:2] == ["train"]:
        return sys.argv[2:]
    # Called from Python (e.g. `openkd run`): the workers read the same settings from a file.
    path = cfg.output_dir / "openkd_train.launch.yaml"
    save_resolved(cfg, path)
    return ["--config", str(path)]


def _has_cuda() -> tuple[bool, bool]:
    import torch

    cuda = torch.cuda.is_available()
    return cuda, bool(cuda and torch.cuda.is_bf16_supported())


def prepare(cfg: TrainConfig, student: str) -> Prepared:
    """Checks that need no weights: settings, data, template and EOS, lengths, output dir."""
    from openkd.train.arguments import check_report_to, check_sft_args, sft_fields
    from openkd.train.checkpoints import find_resume_checkpoint
    from openkd.train.data import load_train_data
    from openkd.train.preflight import (
        check_eos,
        check_prompts_fit,
        prompt_length,
        template_text,
    )
    from openkd.train.runinfo import check_output_dir, clear_output_dir, identity, write_run
    from openkd.train.student import load_eos_settings, load_tokenizer

    check_sft_args(cfg.sft_args, sft_fields())
    check_report_to(cfg.report_to)
    data = load_train_data(
        cfg.dataset,
        eval_dataset=cfg.eval_dataset,
        eval_fraction=cfg.eval_fraction,
        keep_truncated=cfg.keep_truncated,
        max_samples=cfg.max_samples,
        seed=cfg.seed,
        keep_ids=cfg.soft_labels,
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
    steps = 3 if cfg.soft_labels else 2
    _say(f"[bold]pre-flight 1/{steps}[/]: chat template and EOS")
    if cfg.chat_template:
        _say(f"  chat template from {cfg.chat_template} (saved with the student)")
    for line in eos_lines:
        _say(f"  [green]✓[/] {line}")
    if eot.trailing:
        _say(
            f"  [green]✓[/] the template writes {eot.trailing!r} after {eot.token!r} at the end "
            "of a conversation; openkd drops it from every example, so each ends at EOS"
        )
    soft = None
    if cfg.soft_labels:
        from openkd.train.soft import prepare_soft_labels

        soft = prepare_soft_labels(cfg, data, tokenizer, student)
        _say(f"[bold]pre-flight 2/3[/]: the teacher's log-probabilities (--loss {cfg.loss})")
        for line in soft.lines:
            _say(f"  [green]✓[/] {line}")
        for warning in soft.warnings:
            console.warn(warning)
    prompts = (row["prompt"] for row in data.train.select_columns(["prompt"]))
    first_fit = check_prompts_fit(
        (prompt_length(tokenizer, template, p) for p in prompts), cfg.max_length
    )

    ident = identity(cfg, student=student, dataset_fingerprint=data.fingerprint, template=template)
    if soft is not None:  # other teacher data would make the checkpoints another run's
        ident["settings"]["kd_top_k"] = soft.k
    main = console.is_main_process()
    check_output_dir(cfg.output_dir, ident, overwrite=cfg.overwrite)
    if cfg.overwrite and main:
        removed = clear_output_dir(cfg.output_dir)
        if removed:
            console.warn(
                f"--overwrite: removed {len(removed)} item(s) of an earlier run from "
                f"{cfg.output_dir} ({', '.join(removed[:5])}{', ...' if len(removed) > 5 else ''})"
            )
    if main:
        write_run(cfg.output_dir, ident, status="running")
    resume_from = None if cfg.overwrite else find_resume_checkpoint(cfg.output_dir, cfg.resume)
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
    )


def build_trainer(prepared: Prepared) -> OpenkdSFTTrainer:
    """TRL loads the student (`from_pretrained` on its path) and prepares the data."""
    from openkd.train.arguments import lora_config, make_sft_config, sft_kwargs
    from openkd.train.launch import distributed_training_kwargs
    from openkd.train.trainer import OpenkdKDTrainer, OpenkdSFTTrainer, use_console_output

    cfg = prepared.cfg
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
    _say(
        f"--packing: TRL's bfd packing trains padding-free; {where}, so transformers keeps packed "
        "examples apart with a block-diagonal mask built from position_ids (correct, but it "
        "uses memory quadratic in --max-length)"
    )


def check_prepared_example(prepared: Prepared, trainer: OpenkdSFTTrainer) -> None:
    """Pre-flight: EOS agreement on the loaded student, then the loss mask of a real example."""
    from rich.panel import Panel

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
            trainer.processing_class, prepared.soft.reader, row, prepared.eot.token_id
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
    _say(
        f"[bold]pre-flight {steps}/{steps}[/]: loss mask of a training example (trained part "
        "highlighted)"
    )
    console.console.print(
        Panel(marked_text(segments, markers=not console.console.is_terminal), expand=False)
    )
    _say(
        f"  [green]✓[/] {report.trained_tokens} of {report.total_tokens} tokens carry loss: the "
        f"teacher's answer and {prepared.eot.token!r}, none of the prompt"
        + (" (the answer is the teacher's own token ids)" if prepared.soft is not None else "")
    )
    if report.extra_text.strip():
        _say(
            f"  note: the template adds {report.extra_text.strip()!r} to the answer; it is "
            "trained too"
        )


def total_steps(trainer: OpenkdSFTTrainer) -> int:
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    rows = len(cast(Sized, trainer.train_dataset))
    batches = math.ceil(rows / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * per_epoch)


def _start_summary(prepared: Prepared, trainer: OpenkdSFTTrainer) -> None:
    cfg, data = prepared.cfg, prepared.data
    stats = trainer.prepared.get("train")
    args = trainer.args
    fmt = console.fmt_int
    rows: list[tuple[str, str]] = [
        ("student", cfg.student),
        ("teacher", (data.teacher or {}).get("name", "unknown")),
        ("dataset", cfg.dataset),
        ("rows read", fmt(data.filtered.rows)),
    ]
    if data.filtered.kept_incomplete:
        rows.append(
            ("truncated/empty kept", f"{fmt(data.filtered.truncated + data.filtered.empty)}")
        )
    else:
        rows.append(
            (
                "skipped: truncated / empty",
                f"{fmt(data.filtered.truncated)} / {fmt(data.filtered.empty)}",
            )
        )
    if stats is not None:
        dropped = stats.rows_in - stats.examples
        rows.append(("train examples", fmt(stats.examples)))
        if dropped:
            rows.append(("dropped: prompt ≥ --max-length", fmt(dropped)))
        if stats.cut:
            rows.append(("cut at --max-length (no EOS)", fmt(stats.cut)))
            console.warn(
                f"{fmt(stats.cut)} of {fmt(stats.examples)} examples are longer than --max-length "
                f"{cfg.max_length} and lose their end: the student does not learn to stop on "
                "them; raise --max-length if many answers are cut"
            )
        rows.append(
            ("tokens / answer tokens", f"{fmt(stats.tokens)} / {fmt(stats.trained_tokens)}")
        )
    eval_stats = trainer.prepared.get("eval")
    if eval_stats is not None:
        rows.append(("eval examples", fmt(eval_stats.examples)))
    if cfg.packing:
        rows.append(("packed rows", fmt(len(cast(Sized, trainer.train_dataset)))))
    effective = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    rows += [
        ("optimizer steps", fmt(total_steps(trainer))),
        (
            "effective batch",
            f"{effective} ({args.per_device_train_batch_size} × {args.gradient_accumulation_steps}"
            f" accumulation × {args.world_size} process(es))",
        ),
        ("precision", "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32")),
        ("device", str(args.device)),
        (
            "method",
            f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" if cfg.lora else "full fine-tune",
        ),
        ("resume from", str(prepared.resume_from) if prepared.resume_from else "start (step 0)"),
    ]
    if prepared.soft is not None:
        rows.insert(-1, ("loss", loss_description(cfg, prepared.soft.k)))
        rows.insert(-1, ("teacher log-probs", prepared.soft.describe()))
    console.summary_table("openkd train", rows)


def loss_description(cfg: TrainConfig, k: int | None) -> str:
    """The training loss in words, for the summary and the model card."""
    if not cfg.soft_labels:
        return "answer tokens only (completion_only_loss)"
    kl = f"T²·KL(teacher top-{k} + rest ‖ student), T={cfg.temperature:g}"
    if cfg.loss == "soft":
        return f"soft labels: {kl}, answer tokens only"
    return f"mix: {cfg.alpha:g} × CE + {1 - cfg.alpha:g} × {kl}, answer tokens only"


def save_student(prepared: Prepared, trainer: OpenkdSFTTrainer) -> Path:
    """Write the final student to --output-dir (all ranks take part); the folder to use/push."""
    cfg = prepared.cfg
    out = cfg.output_dir
    trainer.save_model(str(out))  # weights (safetensors) + tokenizer with its chat template
    if not console.is_main_process():
        return out
    trainer.save_state()
    model: Any = trainer.model
    if cfg.lora:
        # The adapter folder keeps the EOS/pad settings too, for readers of generation_config.
        model.generation_config.save_pretrained(str(out))
    save_resolved(cfg, out / RESOLVED_CONFIG)
    if cfg.lora and cfg.merge_lora:
        merged = merge_adapter(out, out / MERGED_DIR, prepared, trainer)
        save_resolved(cfg, merged / RESOLVED_CONFIG)
        return merged
    return out


def merge_adapter(adapter_dir: Path, merged_dir: Path, prepared: Prepared, trainer: Any) -> Path:
    """Base weights + LoRA adapter, reloaded from disk (works after ZeRO-3 too), merged, saved."""
    from peft import AutoPeftModelForCausalLM

    _say(f"merging the LoRA adapter into the base weights: {merged_dir}")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(
        str(adapter_dir), dtype="auto", trust_remote_code=prepared.cfg.trust_remote_code
    )
    merged = peft_model.merge_and_unload()
    trained = trainer.model
    merged.generation_config = trained.generation_config
    merged.config.eos_token_id = trained.config.get_text_config().eos_token_id
    merged.config.pad_token_id = trained.config.get_text_config().pad_token_id
    merged.save_pretrained(str(merged_dir))
    trainer.processing_class.save_pretrained(str(merged_dir))
    return merged_dir


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def _results(trainer: OpenkdSFTTrainer, meter: RunMeter) -> dict[str, Any]:
    history = trainer.state.log_history
    stats = trainer.prepared.get("train")
    return {
        "global_step": trainer.state.global_step,
        "steps_this_run": meter.steps,
        "final_loss": _last(history, "loss"),
        "eval_loss": _last(history, "eval_loss"),
        "train_examples": stats.examples if stats else len(cast(Sized, trainer.train_dataset)),
        "trained_tokens_per_epoch": stats.trained_tokens if stats else None,
        "tokens_this_run": meter.tokens,
        "train_seconds": round(meter.seconds, 2),
        "tokens_per_second": round(meter.tokens / meter.seconds, 1) if meter.seconds else None,
    }


def _card_settings(cfg: TrainConfig, trainer: OpenkdSFTTrainer) -> dict[str, Any]:
    args = trainer.args
    settings: dict[str, Any] = {
        "learning rate": cfg.learning_rate,
        "schedule": f"{cfg.lr_scheduler_type}, warmup {cfg.warmup_ratio:g}",
        "epochs" if not cfg.max_steps else "max steps": cfg.max_steps or cfg.epochs,
        "batch (per device × accumulation × processes)": f"{args.per_device_train_batch_size} × "
        f"{args.gradient_accumulation_steps} × {args.world_size}",
        "max length": cfg.max_length,
        "packing": cfg.packing,
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "seed": cfg.seed,
        "loss": loss_description(cfg, getattr(getattr(trainer, "soft", None), "k", None)),
    }
    if cfg.lora:
        targets = ", ".join(cfg.lora_target_modules or ["all-linear"])
        settings["LoRA"] = (
            f"r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, {targets}"
        )
    return settings


def _write_cards(prepared: Prepared, trainer: OpenkdSFTTrainer, results: dict[str, Any]) -> None:
    from openkd.data.jsonl import write_text_atomic
    from openkd.train.card import CardInfo, render_card

    cfg, data = prepared.cfg, prepared.data
    eval_stats = trainer.prepared.get("eval")
    info = CardInfo(
        student=cfg.student,
        dataset=cfg.dataset,
        teacher=data.teacher,
        settings=_card_settings(cfg, trainer),
        train_rows=results["train_examples"],
        eval_rows=eval_stats.examples if eval_stats else 0,
        skipped_rows=data.filtered.skipped,
        trained_tokens=results["trained_tokens_per_epoch"] or 0,
        steps=results["global_step"],
        final_loss=results["final_loss"],
        eval_loss=results["eval_loss"],
        lora=cfg.lora,
        merged=False,
        repo_id=cfg.push_to_hub,
        versions=library_versions("trl", "transformers", "torch", "peft", "datasets", "accelerate"),
    )
    write_text_atomic(cfg.output_dir / "README.md", render_card(info))
    if cfg.lora and cfg.merge_lora:
        merged = dataclasses.replace(info, merged=True)
        write_text_atomic(cfg.output_dir / MERGED_DIR / "README.md", render_card(merged))


def _fmt_loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def _end_summary(prepared: Prepared, results: dict[str, Any], final_dir: Path, wall: float) -> None:
    rows = [
        ("optimizer steps", f"{results['global_step']} ({results['steps_this_run']} in this run)"),
        ("final train loss", _fmt_loss(results["final_loss"])),
    ]
    if results["eval_loss"] is not None:
        rows.append(("final eval loss", _fmt_loss(results["eval_loss"])))
    rate = results["tokens_per_second"]
    rows += [
        ("tokens trained (this run)", console.fmt_int(results["tokens_this_run"])),
        ("train tokens/s", console.fmt_rate(rate) if rate else "n/a"),
        ("wall time", f"{wall:,.1f} s"),
        ("student", str(final_dir)),
    ]
    if prepared.cfg.lora:
        rows.append(("LoRA adapter", str(prepared.cfg.output_dir)))
    console.summary_table("openkd train: done", rows)
