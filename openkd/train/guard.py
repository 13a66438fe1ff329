"""Stop training at the first non-finite loss or gradient norm, before a NaN model is saved.

A learning rate far too high (or an overflow in bf16) makes the loss or the gradients inf or
NaN; from that optimizer step on the weights are garbage, and the Trainer would go on to save
them as checkpoints and as the final student, with exit 0. The guard looks at every optimizer
step (not only at logging steps): the trainer hands it each micro-batch's loss and the step's
gradient norm (the `GuardedTrainer` mixin of every openkd trainer), and at the step's end it
stops the run, cancels that step's checkpoint and evaluation, and flags the run, so
`openkd train` saves nothing and exits with one line (`results.stop_if_diverged`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback


@dataclass(frozen=True)
class Divergence:
    """The first optimizer step whose loss or gradient norm was not finite."""

    step: int
    loss: float | None  # this process's loss of the step (summed over micro-batches)
    grad_norm: float | None
    elsewhere: bool = False  # only another process saw the non-finite value

    def record(self) -> dict[str, Any]:
        """For openkd_run.json: non-finite values as text, since JSON has no NaN or Infinity."""

        def value(v: float | None) -> float | str | None:
            return v if v is None or math.isfinite(v) else str(v)

        return {
            "step": self.step,
            "loss": value(self.loss),
            "grad_norm": value(self.grad_norm),
            "elsewhere": self.elsewhere,
        }

    def describe(self) -> str:
        if self.elsewhere:
            return "another process's loss or gradient norm is not finite"
        parts = [
            f"{name} {value:g}"
            for name, value in (("loss", self.loss), ("gradient norm", self.grad_norm))
            if value is not None and not math.isfinite(value)
        ]
        return " and ".join(parts) + " (not finite)"


class NonFiniteGuard(TrainerCallback):
    """Flags the first non-finite optimizer step and stops training there (all processes)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.diverged: Divergence | None = None
        self._loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | float | None = None

    def add_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's (detached) loss; summed on the device, no host sync."""
        loss = loss.detach().float().reshape(())
        self._loss = loss if self._loss is None else self._loss + loss

    def set_grad_norm(self, grad_norm: torch.Tensor | float | None) -> None:
        self._grad_norm = grad_norm

    def on_step_end(self, args, state, control, **kwargs):
        loss, grad_norm = self._loss, self._grad_norm
        self._loss = self._grad_norm = None
        accelerator = self.trainer.accelerator
        if loss is None or (args.fp16 and accelerator.optimizer_step_was_skipped):
            # fp16 loss scaling skips a step whose gradients overflowed and lowers the scale:
            # the weights did not change, so that is not a divergence.
            return
        norm = torch.as_tensor(
            float("nan") if grad_norm is None else grad_norm, dtype=torch.float32
        ).to(loss.device)
        values = torch.stack([loss, norm.reshape(())])
        bad = (~torch.isfinite(values)).float()
        if grad_norm is None:
            bad[1] = 0.0
        if accelerator.num_processes > 1:
            # Every process must stop at the same step (a save or a step on some ranks only
            # would hang the others), so the flags are summed across processes.
            bad = accelerator.reduce(bad, reduction="sum")
        # The one host sync this adds per optimizer step. The Trainer already syncs on every
        # micro-batch (TRL's token and accuracy metrics, the token count); openkd turns off the
        # Trainer's `logging_nan_inf_filter`, which synced twice per micro-batch to hide NaN
        # losses from the log, so there are fewer syncs per step than without the guard.
        loss_v, norm_v, bad_loss, bad_norm = torch.cat([values, bad]).tolist()
        if bad_loss or bad_norm:
            local = not (math.isfinite(loss_v) and (grad_norm is None or math.isfinite(norm_v)))
            self._stop(
                control,
                Divergence(
                    step=state.global_step,
                    loss=loss_v,
                    grad_norm=None if grad_norm is None else norm_v,
                    elsewhere=not local,
                ),
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        # A second line of defence through the Trainer's public logs (gathered across
        # processes, so every rank decides alike), should a future Trainer stop calling the
        # hooks above. Logging comes before the step's checkpoint, so that is still cancelled.
        if self.diverged is not None or not logs:
            return
        loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
        if any(isinstance(v, float) and not math.isfinite(v) for v in (loss, grad_norm)):
            self._stop(control, Divergence(state.global_step, loss, grad_norm))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.diverged is not None:
            control.should_save = control.should_evaluate = False

    def _stop(self, control: Any, divergence: Divergence) -> None:
        self.diverged = self.diverged or divergence
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False


class GuardedTrainer:
    """Mixin for a transformers `Trainer`: a `NonFiniteGuard` sees every micro-batch's loss and
    every optimizer step's gradient norm. Put it before the Trainer class in the bases and call
    `attach_guard()` after the Trainer's `__init__`."""

    guard: NonFiniteGuard

    def attach_guard(self) -> None:
        self.guard = NonFiniteGuard(self)
        # After the Trainer's own callbacks: the guard may cancel the step's save they ask for.
        self.add_callback(self.guard)  # type: ignore[attr-defined]

    def training_step(self, *args: Any, **kwargs: Any):
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        self.guard.add_loss(loss)
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None):
        # transformers' hook that turns the step's (pre-clip) gradient norm into the value it
        # logs; called once per optimizer step, before the optimizer applies the gradients.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)  # type: ignore[misc]
        self.guard.set_grad_norm(grad_norm)
        return grad_norm
