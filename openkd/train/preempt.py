"""Preemption: on SIGTERM or SIGUSR1, save a checkpoint at the next optimizer step and stop.

Slurm (`--signal`, preemption, `scancel`) and spot clouds send SIGTERM (Slurm can be told to
send SIGUSR1) some time before SIGKILL. The handler only sets a flag. At the end of the next
optimizer step every process agrees (the flag is summed across processes: under `accelerate
launch` the signal may reach only some ranks), and the Trainer saves a regular checkpoint, the
same files in the same order as a `--save-steps` save, so `--resume auto` takes it, and stops.
`openkd train` then records the run as preempted, saves no student, and exits with
`openkd.errors.PREEMPTED` (75): rerunning the same command resumes from that checkpoint.
Before training starts (loading the student, preparing the data) there is nothing to save: the
signal unwinds the loading at once and the run exits 75 too (`PreemptedBeforeStart`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from openkd import console
from openkd.errors import OpenkdError, Preempted, PreemptedBeforeStart

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _SignalBeforeTraining(BaseException):
    """Unwinds the loading: a BaseException, so no library's `except Exception` swallows it."""


class PreemptOnSignal(TrainerCallback):
    """Turns SIGTERM/SIGUSR1 into a checkpoint and a stop at the next optimizer step, or, before
    a trainer is attached, into `PreemptedBeforeStart` at once."""

    def __init__(self, trainer: Any = None) -> None:
        self.trainer = trainer  # None while loading: a signal then stops at once
        self.run: tuple[Path, dict[str, Any]] | None = None  # output dir, identity: recorded
        self.received: int | None = None  # the first signal this process got
        self.stopped_at: int | None = None  # the step whose checkpoint was asked for
        self._previous: dict[signal.Signals, Any] = {}

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Catch the preemption signals while loading and training, until `release()`."""
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only
            return
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in PREEMPT_SIGNALS}
        try:
            yield
        except _SignalBeforeTraining:
            self._record_before_start()
            raise PreemptedBeforeStart() from None
        finally:
            self.release()

    def release(self) -> None:
        """Give the signals their earlier handlers back (training and its record are done)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if self.trainer is None and first:
            raise _SignalBeforeTraining()
        # Training: a flag only; the step in progress (and any collective in it) finishes.

    def _record_before_start(self) -> None:
        """Mark this run's record preempted, with no checkpoint, once `prepare` wrote it."""
        if self.run is None or not console.is_main_process():
            return
        from openkd.train.runinfo import write_run

        output_dir, identity = self.run
        record: dict[str, Any] = {"step": None, "checkpoint": None}
        if self.received is not None:
            record["signal"] = signal.Signals(self.received).name
        write_run(output_dir, identity, status="preempted", preempted=record)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self._agreed()  # every process, every step: it is a collective
        if not requested or self.stopped_at is not None:
            return
        guard = getattr(self.trainer, "guard", None)
        if guard is not None and guard.diverged is not None:
            return  # diverged at this step: nothing is saved (openkd.train.guard)
        if control.should_training_stop:
            return  # the last step: the run ends and saves the student as usual
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # no evaluation in the grace period
        self.stopped_at = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint is written; no epoch-end save or eval
            control.should_save = control.should_evaluate = False

    def _agreed(self) -> bool:
        """True when any process got a preemption signal."""
        local = self.received is not None
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is None or accelerator.num_processes <= 1:
            return local
        import torch

        flag = torch.tensor([1 if local else 0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


def stop_if_preempted(
    output_dir: Path, identity: dict[str, Any], trainer: Any, preempt: Any
) -> None:
    """After a preemption stop: check the checkpoint, record the run as preempted, and raise
    `Preempted` on every process (rank 0 prints it). The student is not saved."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from openkd.train.integrity import checkpoint_problems
    from openkd.train.runinfo import write_run

    step = preempt.stopped_at
    if step is None:
        return
    checkpoint = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()  # every rank's part of the checkpoint is written
    problems: list[str] = []
    if console.is_main_process():
        problems = checkpoint_problems(checkpoint, expected_step=step)
        record = {"step": step, "checkpoint": str(checkpoint)}
        if preempt.received is not None:
            record["signal"] = signal.Signals(preempt.received).name
        if not problems:  # a launcher and the Slurm script requeue on this record
            write_run(output_dir, identity, status="preempted", preempted=record)
    # No rank exits before the record is written: a launcher may stop the others as soon as
    # one exits, and `openkd train`'s launcher reads the record to report the preemption.
    accelerator.wait_for_everyone()
    if problems:
        raise OpenkdError(
            f"preempted at step {step}, but its checkpoint {checkpoint} is incomplete "
            f"({'; '.join(problems)}); rerun the same command to resume from the newest valid "
            "checkpoint"
        )
    raise Preempted(step, str(checkpoint))
