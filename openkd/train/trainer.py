"""TRL's `SFTTrainer` with openkd's additions, and the Trainer's progress output kept off stdout.

Dataset preparation stays TRL's (chat template, completion mask, truncation, bfd packing);
openkd runs it unpacked first, drops the template's tokens after each example's final EOS
(see `preflight`), counts tokens, then lets TRL pack. Imported only once training is certain:
it imports TRL, transformers and torch.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from trl import SFTTrainer

from openkd import console
from openkd.train.guard import GuardedTrainer
from openkd.train.preflight import IGNORE, drop_after_last_eos


@dataclass(frozen=True)
class PreparedStats:
    """One prepared (tokenised, masked, truncated, unpacked) dataset."""

    rows_in: int  # rows handed to the trainer
    examples: int  # left after TRL drops examples with no answer token (prompt >= max_length)
    tokens: int
    trained_tokens: int
    cut: int  # examples that do not end with EOS: cut at --max-length
    trimmed: int  # examples whose template tokens after the final EOS were dropped


def _trim_batch(batch: dict[str, list], eos_id: int) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "_trimmed": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        new_ids, new_labels = drop_after_last_eos(ids, labels, eos_id)
        out["input_ids"].append(new_ids)
        out["labels"].append(new_labels)
        out["_trimmed"].append(len(new_ids) < len(ids))
    return out


def token_stats(dataset: Any, eos_id: int) -> tuple[int, int, int]:
    """(tokens, trained tokens, examples not ending in EOS), computed on Arrow columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tokens = trained = cut = 0
    for table in dataset.with_format("arrow").iter(batch_size=20_000):
        ids = table.column("input_ids").combine_chunks()
        labels = table.column("labels").combine_chunks()
        tokens += pc.sum(pc.list_value_length(ids)).as_py() or 0
        trained += (
            pc.sum(pc.cast(pc.not_equal(pc.list_flatten(labels), IGNORE), pa.int64())).as_py() or 0
        )
        ends = pc.subtract(ids.offsets.slice(1), 1)
        last = ids.values.take(ends)
        cut += pc.sum(pc.cast(pc.not_equal(last, eos_id), pa.int64())).as_py() or 0
    return tokens, trained, cut


class OpenkdSFTTrainer(GuardedTrainer, SFTTrainer):
    """SFTTrainer whose examples end at EOS, with token counts for openkd's summaries."""

    def __init__(self, *args: Any, eos_id: int, trim_after_eos: bool, **kwargs: Any) -> None:
        """`trim_after_eos`: the chat template writes tokens after EOS (see `preflight`)."""
        self.eos_id = eos_id
        self.trim_after_eos = trim_after_eos
        self.prepared: dict[str, PreparedStats] = {}
        super().__init__(*args, **kwargs)
        self.attach_guard()

    def _prepare_dataset(
        self, dataset, processing_class, args, packing, formatting_func, dataset_name
    ):
        # TRL's preparation unpacked (tokenise, mask, truncate), then openkd's trim and counts,
        # then TRL again to pack: it skips the steps already done on a tokenised dataset.
        rows_in = len(dataset)
        dataset = super()._prepare_dataset(
            dataset, processing_class, args, False, formatting_func, dataset_name
        )
        if len(dataset) and "input_ids" in dataset.column_names:
            trimmed = 0
            if self.trim_after_eos:
                dataset = dataset.map(
                    _trim_batch,
                    batched=True,
                    fn_kwargs={"eos_id": self.eos_id},
                    num_proc=args.dataset_num_proc,
                    desc=f"Ending {dataset_name} examples at EOS",
                )
                trimmed = sum(dataset["_trimmed"])
                dataset = dataset.remove_columns("_trimmed")
            self._record_stats(dataset_name, dataset, rows_in, trimmed)
        if packing and len(dataset):
            dataset = super()._prepare_dataset(
                dataset, processing_class, args, True, formatting_func, dataset_name
            )
        return dataset

    def _record_stats(self, name: str, dataset: Any, rows_in: int, trimmed: int) -> None:
        tokens, trained, cut = token_stats(dataset, self.eos_id)
        self.prepared[name] = PreparedStats(
            rows_in=rows_in,
            examples=len(dataset),
            tokens=tokens,
            trained_tokens=trained,
            cut=cut,
            trimmed=trimmed,
        )

    def prepare_one(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """One raw row through the same preparation as the training data (None if dropped)."""
        from datasets import Dataset
        from datasets.utils.tqdm import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        quiet_already = are_progress_bars_disabled()
        disable_progress_bars()  # five bars for one row would only be noise
        try:
            done = self._prepare_dataset(
                Dataset.from_list([row]), self.processing_class, self.args, False, None, "one"
            )
        finally:
            if not quiet_already:
                enable_progress_bars()
        self.prepared.pop("one", None)
        return done[0] if len(done) else None


class OpenkdKDTrainer(OpenkdSFTTrainer):
    """Soft-label distillation: the student against the teacher's stored top-K log-probabilities.

    Dataset preparation builds each example on the teacher's own completion ids (see
    `openkd.train.soft`), the collator adds the teacher's arrays, and `compute_loss` asks the
    model (patched by `openkd.distill.kd.add_kd_head`) for the loss of `openkd.distill.kd`. TRL's
    labels (-100 on the prompt) decide which positions carry loss; checkpointing, resume,
    LoRA and DeepSpeed are the Trainer's, unchanged.
    """

    data_collator: Any  # set by the Trainer, wrapped here

    def __init__(
        self, *args: Any, soft: Any, alpha: float, temperature: float, **kwargs: Any
    ) -> None:
        from openkd.distill.kd import add_kd_head
        from openkd.train.soft import TeacherCollator

        self.soft = soft
        self.alpha = alpha
        self.temperature = temperature
        super().__init__(*args, **kwargs)
        wrapped: Any = self.model
        model = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
        add_kd_head(model, alpha=alpha, temperature=temperature)
        self.data_collator = TeacherCollator(self.data_collator, soft.reader, soft.vocab_size)

    def _prepare_dataset(
        self, dataset, processing_class, args, packing, formatting_func, dataset_name
    ):
        from trl.trainer.utils import global_then_local_main_first

        from openkd.train.soft import has_answer, tokenize_rows

        if "input_ids" in dataset.column_names:  # prepared already
            return dataset
        rows_in = len(dataset)
        with global_then_local_main_first():
            dataset = dataset.map(
                tokenize_rows,
                batched=True,
                fn_kwargs={
                    "tokenizer": self._tokenizer,
                    "reader": self.soft.reader,
                    "eos_id": self.eos_id,
                    "max_length": args.max_length,
                    "aligner": self.soft.aligner,
                },
                remove_columns=[c for c in dataset.column_names if c != "id"],
                num_proc=args.dataset_num_proc,
                desc=f"Tokenizing {dataset_name} dataset (answers: the teacher's token ids)",
            )
            # A prompt that fills --max-length leaves no answer token: nothing to train on.
            dataset = dataset.filter(
                has_answer,
                batched=True,
                num_proc=args.dataset_num_proc,
                desc=f"Dropping {dataset_name} examples whose prompt fills --max-length",
            )
        if len(dataset):
            self._record_stats(dataset_name, dataset, rows_in, 0)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        from openkd.train.soft import CROSS_KEYS

        for column in ("id", "kd_start", *(CROSS_KEYS if self.soft.aligner else ())):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        # As TRL and Trainer: num_items_in_batch counts every rank's tokens, DDP averages.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._record_kd_metrics(mode, inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    def _record_kd_metrics(self, mode: str, inputs: dict[str, Any], outputs: Any) -> None:
        import torch

        values = torch.stack(
            [
                outputs.positions.double(),
                outputs.ce_sum.double(),
                outputs.kl_sum.double(),
                outputs.teacher_positions.double(),
                outputs.agree.double(),
                outputs.correct.double(),
            ]
        ).detach()
        # gather, not gather_for_metrics: these are per-process sums, not per-sample values
        positions, ce, kl, teacher, agree, correct = (
            self.accelerator.gather(values[None]).sum(0).tolist()
        )
        metrics = self._metrics[mode]
        if positions:
            metrics["ce"].append(ce / positions)
            metrics["mean_token_accuracy"].append(correct / positions)
        if teacher:
            metrics["kl"].append(kl / teacher)
            metrics["top1_agreement"].append(agree / teacher)
        if mode == "train":
            tokens = inputs["attention_mask"].sum().reshape(1)
            self._total_train_tokens += int(self.accelerator.gather(tokens).sum())
        metrics["num_tokens"] = [self._total_train_tokens]


def format_log(step: int, max_steps: int, logs: dict[str, Any]) -> str | None:
    """One readable line for a Trainer log entry; None for entries without a loss (totals)."""
    if "loss" not in logs and "eval_loss" not in logs:
        return None
    parts = [f"step {step}/{max_steps}"]
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("eval_loss", "eval loss", "{:.4f}"),
        ("kl", "kl", "{:.4f}"),
        ("eval_kl", "eval kl", "{:.4f}"),
        ("top1_agreement", "top-1 agreement", "{:.3f}"),
        ("mean_token_accuracy", "token acc", "{:.3f}"),
        # --loss on-policy
        ("reverse_kl", "reverse KL", "{:.4f}"),
        ("eval_reverse_kl", "eval reverse KL", "{:.4f}"),
        ("completions/mean_length", "sample len", "{:.1f}"),
        ("completions/clipped_ratio", "cut", "{:.0%}"),
        ("generate_share", "sampling", "{:.0%}"),
        ("score_share", "teacher", "{:.0%}"),
        ("grad_norm", "grad norm", "{:.3g}"),
        ("learning_rate", "lr", "{:.3g}"),
        ("epoch", "epoch", "{:.2f}"),
        ("train_tokens_per_second", "tokens/s", "{:,.0f}"),
    ):
        if isinstance(logs.get(key), int | float):
            parts.append(f"{label} {fmt.format(logs[key])}")
    return "  ".join(parts)


class ConsoleProgress(ProgressCallback):
    """The Trainer's progress bar, with log lines on stderr: stdout carries only the model path."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_log(state.global_step, state.max_steps, logs)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line, file=sys.stderr)
        else:
            console.info(line)


class ConsoleLog(TrainerCallback):
    """Log lines without a bar (when the user turns tqdm off)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = format_log(state.global_step, state.max_steps, logs)
            if line is not None:
                console.info(line)


def use_console_output(trainer: Trainer) -> None:
    """Swap the Trainer's stdout printers for openkd's stderr ones."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleLog() if trainer.args.disable_tqdm else ConsoleProgress())


class RunMeter(TrainerCallback):
    """Steps, tokens and seconds of this `train()` call (a resumed run counts only its part)."""

    def __init__(self) -> None:
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self._begin: tuple[int, int, float] = (0, 0, 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._begin = (state.global_step, state.num_input_tokens_seen, time.monotonic())

    def on_train_end(self, args, state, control, **kwargs):
        step, tokens, t0 = self._begin
        self.steps = state.global_step - step
        self.tokens = state.num_input_tokens_seen - tokens
        self.seconds = time.monotonic() - t0


class TrainingAlreadyComplete(Exception):
    """Raised before the first step of a run resumed at (or past) its last step."""

    def __init__(self, step: int, max_steps: int) -> None:
        super().__init__(f"step {step} of {max_steps}: nothing left to train")
        self.step = step
        self.max_steps = max_steps


class StopWhenComplete(TrainerCallback):
    """Refuses to train past the last step.

    transformers 5.19 resumed from a checkpoint at global_step == max_steps runs one more
    optimizer step (and writes checkpoint-{max_steps + 1}) whenever max_steps is not a whole
    number of epochs: it checks for the end only after a step. This raises
    `TrainingAlreadyComplete` before that step, with the checkpoint's weights loaded, so the
    caller can save the finished student again without changing it.
    """

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise TrainingAlreadyComplete(state.global_step, state.max_steps)
