"""`openkd train` after the last step: the saved student, its card, the run's results."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from openkd import console
from openkd.config import save_resolved
from openkd.system import library_versions
from openkd.train.config import TrainConfig

if TYPE_CHECKING:
    from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer
    from openkd.train.prepare import Prepared
    from openkd.train.trainer import OpenkdSFTTrainer, RunMeter

    # Both of openkd's trainers: SFT (hard and soft labels) and on-policy distillation.
    Trainer = OpenkdSFTTrainer | OpenkdOnPolicyTrainer

RESOLVED_CONFIG = "openkd_train.yaml"
MERGED_DIR = "merged"


def total_steps(trainer: Trainer) -> int:
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    rows = len(cast(Sized, trainer.train_dataset)) * getattr(trainer, "samples_per_prompt", 1)
    batches = math.ceil(rows / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * per_epoch)


def start_summary(prepared: Prepared, trainer: Trainer) -> None:
    cfg, data = prepared.cfg, prepared.data
    stats = trainer.prepared.get("train")
    args = trainer.args
    fmt = console.fmt_int
    rows: list[tuple[str, str]] = [
        ("student", cfg.student),
        ("teacher", cfg.teacher or (data.teacher["name"] if data.teacher else "unknown")),
        ("dataset", cfg.dataset),
    ]
    if prepared.on_policy is not None:
        from openkd.train.onpolicy.setup import start_rows

        rows += start_rows(prepared, trainer)
        stats = None  # prompts, not examples: start_rows counted them
    elif data.filtered.kept_incomplete:
        rows.append(("rows read", fmt(data.filtered.rows)))
        rows.append(
            ("truncated/empty kept", f"{fmt(data.filtered.truncated + data.filtered.empty)}")
        )
    else:
        rows.append(("rows read", fmt(data.filtered.rows)))
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
    if eval_stats is not None and prepared.on_policy is None:
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
        if prepared.soft.coverage is not None:
            rows.insert(-1, ("cross-tokenizer", prepared.soft.describe_cross() or ""))
    console.summary_table("openkd train", rows)


def loss_description(cfg: TrainConfig, k: int | None, method: str | None = None) -> str:
    """The training loss in words, for the summary and the model card."""
    if cfg.on_policy:
        from openkd.train.onpolicy.setup import loss_description as on_policy_loss

        return on_policy_loss(cfg, method)
    if not cfg.soft_labels:
        return "answer tokens only (completion_only_loss)"
    kl = f"T²·KL(teacher top-{k} + rest ‖ student), T={cfg.temperature:g}"
    if cfg.loss == "soft":
        return f"soft labels: {kl}, answer tokens only"
    return f"mix: {cfg.alpha:g} × CE + {1 - cfg.alpha:g} × {kl}, answer tokens only"


def stop_if_diverged(prepared: Prepared, trainer: Any) -> None:
    """After a non-finite loss or gradient norm (`openkd.train.guard`): save nothing, record
    the run as diverged, and stop with one line naming the step, the value and the fix. Every
    process decided alike, so all of them skip the (collective) save and raise."""
    from openkd.errors import OpenkdError
    from openkd.train.checkpoints import list_checkpoints
    from openkd.train.runinfo import write_run

    guard = getattr(trainer, "guard", None)  # every openkd trainer has one (openkd.train.guard)
    diverged = guard.diverged if guard is not None else None
    if diverged is None:
        return
    cfg = prepared.cfg
    if console.is_main_process():
        write_run(
            cfg.output_dir,
            prepared.identity,
            status="diverged",
            diverged=diverged.record(),
        )
    kept = [c for c in list_checkpoints(cfg.output_dir) if c.step < diverged.step]
    where = (
        f"the checkpoints before it are kept (newest: {kept[0].path.name})"
        if kept
        else "no checkpoint was saved before it"
    )
    raise OpenkdError(
        f"training diverged at step {diverged.step}: {diverged.describe()}; the student was not "
        f"saved and {where}; lower --learning-rate (--learning-rate {cfg.learning_rate:g} now) "
        "or clip harder (sft_args: {max_grad_norm: 0.5}), and pass --overwrite to start afresh"
    )


def save_student(prepared: Prepared, trainer: Trainer) -> Path:
    """Write the final student to --output-dir (all ranks take part); the folder to use/push."""
    cfg = prepared.cfg
    out = cfg.output_dir
    trainer.save_model(str(out))  # weights (safetensors) + tokenizer with its chat template
    # The run's last collective: no rank leaves with another's work in flight (a worker that
    # exits while a gloo collective of ZeRO-3's is still running can abort at exit).
    trainer.accelerator.wait_for_everyone()
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

    console.info(f"merging the LoRA adapter into the base weights: {merged_dir}")
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


def results(trainer: Trainer, meter: RunMeter) -> dict[str, Any]:
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
        # --loss on-policy: the reverse KL at start and end, where the step time went
        **(trainer.run_results() if hasattr(trainer, "run_results") else {}),
        **_cross_tokenizer(trainer),
    }


def _cross_tokenizer(trainer: Trainer) -> dict[str, Any]:
    """--loss soft|mix across tokenizers: the method and the pre-flight's coverage."""
    coverage = getattr(getattr(trainer, "soft", None), "coverage", None)
    return {"cross_tokenizer": coverage.record()} if coverage is not None else {}


def _card_settings(cfg: TrainConfig, trainer: Trainer) -> dict[str, Any]:
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
        "loss": loss_description(
            cfg,
            getattr(getattr(trainer, "soft", None), "k", None),
            getattr(trainer, "method", None),  # --loss on-policy across tokenizers: gold/uld
        ),
    }
    cross = _cross_tokenizer(trainer).get("cross_tokenizer")
    if cross:
        settings["cross-tokenizer"] = (
            f"{cross['method']}, coverage {cross['coverage']:.1%} (exact {cross['exact']:.1%}, "
            f"merged {cross['merged']:.1%}, ULD {cross['uld']:.1%}) of {cross['positions']:,} "
            f"answer tokens of the first {cross['rows']} rows"
        )
    if cfg.lora:
        targets = ", ".join(cfg.lora_target_modules or ["all-linear"])
        settings["LoRA"] = (
            f"r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, {targets}"
        )
    return settings


def write_cards(
    prepared: Prepared, trainer: Trainer, results: dict[str, Any], curves: Path | None = None
) -> None:
    """The student's card; `curves`, the training curves PNG in --output-dir, is linked."""
    from openkd.data.jsonl import write_text_atomic
    from openkd.data.teacher import DatasetTeacher
    from openkd.train.card import CardInfo, render_card

    cfg, data = prepared.cfg, prepared.data
    eval_stats = trainer.prepared.get("eval")
    extra: dict[str, Any] = {}
    if prepared.on_policy is not None:
        from openkd.train.onpolicy.setup import card_fields

        extra = card_fields(cfg, results)
    info = CardInfo(
        student=cfg.student,
        dataset=cfg.dataset,
        teacher=DatasetTeacher(name=cfg.teacher or "unknown") if cfg.on_policy else data.teacher,
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
        curves=curves.name if curves is not None else None,
        **extra,
    )
    write_text_atomic(cfg.output_dir / "README.md", render_card(info))
    if cfg.lora and cfg.merge_lora:
        merged = dataclasses.replace(info, merged=True)
        if curves is not None:  # the merged folder is what gets shared: its card's picture too
            try:
                shutil.copyfile(curves, cfg.output_dir / MERGED_DIR / curves.name)
            except OSError as exc:
                console.warn(f"{curves.name} not copied to {MERGED_DIR}/: {exc}")
                merged = dataclasses.replace(merged, curves=None)
        write_text_atomic(cfg.output_dir / MERGED_DIR / "README.md", render_card(merged))


def _fmt_loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def end_summary(prepared: Prepared, results: dict[str, Any], final_dir: Path, wall: float) -> None:
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
    if prepared.on_policy is not None:
        from openkd.train.onpolicy.setup import end_rows

        rows[-2:-2] = end_rows(results)
    if prepared.cfg.lora:
        rows.append(("LoRA adapter", str(prepared.cfg.output_dir)))
    console.summary_table("openkd train: done", rows)
