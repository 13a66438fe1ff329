"""`openkd train`: fine-tune a student on a teacher's answers with TRL SFT.

Order matters: cheap checks (paths), then the multi-process relaunch, then everything that
can fail without loading weights (`prepare`: SFT settings, dataset, tokenizer, chat
template and EOS, prompt lengths, the output directory's run), then TRL loads the student and
prepares the data, the pre-flight checks run on a prepared example, and training starts. The
final student (weights, tokenizer, template, generation_config, card, resolved config) goes to
`--output-dir` (`results`); its path is the only thing printed on stdout.

Under `accelerate launch` every process runs this; only rank 0 prints, writes the run record,
card and merged model, and pushes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from openkd import console
from openkd.config import save_resolved
from openkd.data.sources import require_source
from openkd.errors import Preempted, PreemptedBeforeStart
from openkd.train.checkpoints import check_resume_exists
from openkd.train.config import TrainConfig
from openkd.train.finish import (
    end_summary,
    results,
    save_student,
    start_summary,
    stop_if_diverged,
    write_cards,
)
from openkd.train.prepare import build_trainer, check_prepared_example, prepare
from openkd.train.runinfo import (
    LAUNCH_CONFIG,
    check_inputs_outside,
    check_output_dir_usable,
    check_unmarked,
)
from openkd.train.student import read_template_file, resolve_student
from openkd.versions import check_trl

if TYPE_CHECKING:
    from openkd.teacher.served import Endpoint
    from openkd.train.preempt import PreemptOnSignal


def run(cfg: TrainConfig) -> None:
    started = time.monotonic()
    student = resolve_student(cfg.student)
    require_source(cfg.dataset, "--dataset")
    if cfg.eval_dataset:
        require_source(cfg.eval_dataset, "--eval-dataset")
    if cfg.chat_template:
        read_template_file(cfg.chat_template)
    check_inputs_outside(cfg)
    check_output_dir_usable(cfg.output_dir)
    if console.is_main_process():  # another rank could see rank 0 clearing it (--overwrite)
        check_unmarked(cfg.output_dir, overwrite=cfg.overwrite)
    if not cfg.overwrite:
        check_resume_exists(cfg.resume)

    from openkd.train.launch import relaunch_if_needed
    from openkd.train.onpolicy.served import teacher_server
    from openkd.train.preempt import PreemptOnSignal

    launching = bool(cfg.accelerate_config or cfg.deepspeed or cfg.num_processes)
    # SIGTERM/SIGUSR1: while loading, exit 75 at once; once training runs, a checkpoint first.
    preempt = PreemptOnSignal()
    # --teacher-serve: one server for the run, shared with launched workers, always stopped.
    with preempt.handling_signals(), teacher_server(cfg, student) as served:
        if launching and relaunch_if_needed(cfg, _launch_argv(cfg)):
            return
        with _stdout_to_stderr(), _process_group_released() as group:
            final_dir = train(cfg, student, started, preempt, served)
    if final_dir is not None:
        console.stdout_line(str(final_dir))
    if group.released:
        _exit_without_teardown()


def train(
    cfg: TrainConfig,
    student: str,
    started: float,
    preempt: PreemptOnSignal,
    served: Endpoint | None = None,
) -> Path | None:
    """The training run in this process; the final student's folder (None off rank 0).
    `preempt`: handling the preemption signals; `served`: --teacher-serve's server, when this
    process started it."""
    check_trl()  # TRL has the APIs openkd extends (a launcher checked before starting us)
    from openkd.train.preempt import stop_if_preempted
    from openkd.train.runinfo import write_run
    from openkd.train.trainer import RunMeter, StopWhenComplete, TrainingAlreadyComplete

    prepared = prepare(cfg, student, served)
    preempt.run = (cfg.output_dir, prepared.identity)
    trainer = build_trainer(prepared)
    check_prepared_example(prepared, trainer)
    start_summary(prepared, trainer)
    meter = RunMeter()
    trainer.add_callback(meter)
    trainer.add_callback(StopWhenComplete())
    preempt.trainer = trainer  # from here on a signal means a checkpoint at the next step
    trainer.add_callback(preempt)
    try:
        trainer.train(
            resume_from_checkpoint=str(prepared.resume_from) if prepared.resume_from else None
        )
    except TrainingAlreadyComplete as done:
        # Close the progress bar and let trackers finish, as a normal end of training does.
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        console.info(f"training is complete ({done}); saving the student again")
    stop_if_preempted(cfg.output_dir, prepared.identity, trainer, preempt)
    preempt.release()  # saving the student: a signal now stops it as before (exit 143)
    stop_if_diverged(prepared, trainer)
    final_dir = save_student(prepared, trainer)
    if not console.is_main_process():
        return None
    outcome = results(trainer, meter)
    from openkd.train.curves import write_curves

    write_cards(prepared, trainer, outcome, write_curves(trainer.state.log_history, cfg.output_dir))
    write_run(cfg.output_dir, prepared.identity, status="complete", results=outcome)
    if cfg.push_to_hub:
        from openkd.train.hub import push_folder

        url = push_folder(
            final_dir,
            cfg.push_to_hub,
            private=cfg.private,
            retry="rerun the same command: training is complete and is not repeated, the "
            f"push is retried (or run `hf upload {cfg.push_to_hub} {final_dir}`)",
        )
        console.info(f"pushed to {url}")
    end_summary(prepared, outcome, final_dir, time.monotonic() - started)
    return final_dir


@dataclass
class _Group:
    released: bool = False


@contextlib.contextmanager
def _process_group_released() -> Iterator[_Group]:
    """Destroy torch.distributed's process group once training has ended on this rank, or
    stopped for a preemption (every rank passed the same barrier first); `released` says
    whether there was one.

    Left to interpreter exit, gloo's worker threads can abort the process ("terminate called
    without an active exception", SIGABRT: pytorch#190489), which failed a finished 2-process
    ZeRO-3 run. Not after a failure: a rank still inside a collective would hang the others.
    """
    group = _Group()
    try:
        yield group
    except PreemptedBeforeStart:  # signalled while loading: no barrier passed
        raise
    except Preempted:
        group.released = release_process_group()
        raise
    group.released = release_process_group()


def release_process_group() -> bool:
    """`torch.distributed.destroy_process_group()` when a process group is up; whether it was."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
        return True
    return False


def _exit_without_teardown() -> None:
    """End a worker whose training finished, and whose files are all written and closed, without
    the interpreter's teardown: even with the process group destroyed, a 2-process ZeRO-3 worker
    still aborted there now and then (SIGABRT from a C++ thread taking the GIL while the
    interpreter shuts down), failing a finished run. Logs and streams are flushed first."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def _launch_argv(cfg: TrainConfig) -> list[str]:
    """The arguments the launched workers get: this command's, or the resolved config."""
    if sys.argv[1:2] == ["train"]:
        return sys.argv[2:]
    # Called from Python (e.g. `openkd run`): the workers read the same settings from a file.
    path = cfg.output_dir / LAUNCH_CONFIG
    save_resolved(cfg, path)
    return ["--config", str(path)]
