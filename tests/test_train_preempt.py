"""`openkd train` survives preemption: SIGTERM or SIGUSR1 mid-run saves a checkpoint at the
next optimizer step and exits 75; the rerun resumes from it and ends with the weights of a run
that was never interrupted (CPU training is deterministic for a fixed seed: compared bitwise).

Every training run is the CLI in a subprocess, signalled once a training step has been logged;
the fast tests drive the callback, the launcher's report and the CLI's exit directly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from openkd.errors import PREEMPTED
from openkd.train.checkpoints import find_resume_checkpoint
from openkd.train.integrity import checkpoint_problems
from tests.conftest import run_cli
from tests.helpers import sharper_copy
from tests.train_helpers import TINY_RUN, train_argv, write_reverse_dataset
from tests.train_resume_helpers import assert_same_weights, flat, global_step

ENV = {"OMP_NUM_THREADS": "1"}
MAX_STEPS = 16
PREEMPTED_LINE = re.compile(
    r"preempted at step (\d+): checkpoint saved to (\S+); rerun the same command to resume"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reverse_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


def train_args(tiny_model: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    # --save-steps 100: no regular checkpoint, only the preemption's
    return train_argv(
        tiny_model, dataset, out, *extra, base=TINY_RUN, max_steps=MAX_STEPS, save_steps=100
    )


STEP_LOGGED = r"\bstep [1-9]\d*/\d+"
SLOW_SITE = Path(__file__).resolve().parent / "slow_site"  # test-only slow-downs, by env var


def signal_during_training(
    args: list[str],
    sig: int,
    *,
    pick=None,
    timeout: float = 600,
    when: str = STEP_LOGGED,
    matches: int = 1,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run `openkd ARGS`, send `sig` once `matches` stderr lines have matched `when` (default:
    step 1 is logged) to `pick(parent)`'s pid (default the parent), and return the exit code
    and stderr. `env`: more environment; tests/slow_site's slow-downs are on the path."""
    path = os.pathsep.join(p for p in (str(SLOW_SITE), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "openkd", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV, "PYTHONPATH": path, **(env or {})},
        start_new_session=True,
    )
    lines: list[str] = []
    sent = threading.Event()
    seen = 0

    def read() -> None:
        nonlocal seen
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            seen += bool(re.search(when, line))
            if not sent.is_set() and seen >= matches:
                target = pick(proc) if pick else proc.pid
                os.kill(target, sig)
                sent.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    err = "".join(lines)
    assert code is not None, f"no exit {timeout:g} s after start:\n{err[-3000:]}"
    assert sent.is_set(), f"nothing matched {when!r} on stderr:\n{err[-3000:]}"
    return code, err


def assert_preempted(code: int, err: str, out: Path, max_steps: int = MAX_STEPS) -> int:
    """Exit 75, one line naming a whole checkpoint that `--resume auto` takes, no student."""
    assert code == PREEMPTED, err[-3000:]
    found = PREEMPTED_LINE.search(flat(err))
    assert found, err[-3000:]
    step, ckpt = int(found.group(1)), Path(found.group(2))
    assert 1 <= step < max_steps
    assert ckpt == out / f"checkpoint-{step}"
    assert checkpoint_problems(ckpt, expected_step=step) == []
    assert find_resume_checkpoint(out, "auto") == ckpt
    assert not (out / "model.safetensors").exists(), "a preempted run saved a student"
    assert not [line for line in err.splitlines() if line.startswith("error:")]
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["status"] == "preempted"
    assert run["preempted"]["step"] == step and run["preempted"]["checkpoint"] == str(ckpt)
    return step


def rerun_resumes(args: list[str], out: Path, step: int, max_steps: int = MAX_STEPS) -> None:
    proc = run_cli(*args, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{step}'} at step {step} of {max_steps}" in flat(
        proc.stderr
    )
    assert global_step(out) == max_steps
    assert json.loads((out / "openkd_run.json").read_text())["status"] == "complete"


@pytest.fixture(scope="module")
def reference(tiny_model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = run_cli(*train_args(tiny_model, dataset, out), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_signal_saves_a_checkpoint_and_the_rerun_ends_like_an_uninterrupted_run(
    sig: int, tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = train_args(tiny_model, dataset, out)
    code, err = signal_during_training(args, sig)
    step = assert_preempted(code, err, out)
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["preempted"]["signal"] == signal.Signals(sig).name
    if sig == signal.SIGTERM:  # what the rerun does does not depend on the signal that stopped it
        rerun_resumes(args, out, step)
        assert_same_weights(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank1", "openkd"])
def test_two_processes_save_together_when_one_rank_is_signalled(
    target: str, tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    """Under `accelerate launch` (DDP, 2 CPU processes) SIGTERM reaches rank 1 only, or
    `openkd train` (which passes it to its workers): both ranks save the step's checkpoint, and
    `openkd train` exits 75 with the one line and no launcher traceback. Also the DDP launch
    itself: --num-processes alone uses the shipped ddp.yaml, and both ranks join."""
    import psutil

    def rank_one(parent: subprocess.Popen) -> int:
        for child in psutil.Process(parent.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "1":
                    return child.pid
            except psutil.Error:
                continue
        raise AssertionError("no rank-1 worker found")

    out = tmp_path / "out"
    args = train_args(tiny_model, dataset, out, "--num-processes", "2", "--batch-size", "4")
    pick = rank_one if target == "rank1" else None
    code, err = signal_during_training(args, signal.SIGTERM, pick=pick, timeout=900)
    step = assert_preempted(code, err, out)
    assert "Traceback" not in err, err[-3000:]
    assert "ddp.yaml --num_processes 2" in flat(err)
    assert "× 2 process(es)" in flat(err)  # both ranks joined: world size 2
    ckpt = out / f"checkpoint-{step}"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    run = json.loads((out / "openkd_run.json").read_text())
    if target == "rank1":
        assert "signal" not in run["preempted"]  # rank 0 was not signalled itself
        rerun_resumes(args, out, step)
    else:
        assert run["preempted"]["signal"] == "SIGTERM"


@pytest.mark.slow
def test_on_policy_sigterm_saves_and_the_rerun_ends_like_an_uninterrupted_run(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    teacher = sharper_copy(tiny_model, tmp_path / "teacher", 4.0)
    max_steps = 5

    def op_args(out: Path) -> list[str]:
        return [
            "train",
            "--student", str(tiny_model),
            "--teacher", str(teacher),
            "--dataset", str(dataset),
            "--output-dir", str(out),
            "--loss", "on-policy",
            "--max-steps", str(max_steps),
            "--save-steps", "100",
            "--batch-size", "4",
            "--max-completion-length", "12",
            "--max-length", "64",
            "--learning-rate", "5e-3",
            "--logging-steps", "1",
            "--seed", "7",
        ]  # fmt: skip

    reference = tmp_path / "reference"
    proc = run_cli(*op_args(reference), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    code, err = signal_during_training(op_args(out), signal.SIGTERM)
    step = assert_preempted(code, err, out, max_steps)
    rerun_resumes(op_args(out), out, step, max_steps)
    assert_same_weights(out, reference)


@pytest.mark.slow
def test_one_process_behind_the_plain_launcher_gets_the_time_a_slow_step_needs(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    """accelerate's plain launcher (one process, distributed_type NO) kills its worker 5 s
    after a SIGTERM; `openkd train` signals the worker alone, so a step that ends 8 s after the
    signal still saves its checkpoint and the run exits 75."""
    config = tmp_path / "single.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\n"
        "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n"
    )
    out = tmp_path / "out"
    args = train_args(tiny_model, dataset, out, "--accelerate-config", str(config))
    code, err = signal_during_training(
        args, signal.SIGTERM, env={"OPENKD_TEST_SLOW_STEP": "8"}, timeout=900
    )
    assert "launching: python -m accelerate.commands.launch" in flat(err)
    assert "test: this step takes 8 s more" in err  # the hook ran in the worker
    assert_preempted(code, err, out)
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["plain", "launched"])
def test_a_signal_while_loading_exits_75_at_once_with_nothing_saved(
    processes: int, tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    """SIGTERM while the student loads (made 600 s long here: exiting at once is what lets the
    test end) stops with the one line and 75; the run record claims no checkpoint."""
    out = tmp_path / "out"
    extra = ["--num-processes", "2", "--batch-size", "4"] if processes == 2 else []
    code, err = signal_during_training(
        train_args(tiny_model, dataset, out, *extra),
        signal.SIGTERM,
        # Every rank in its (slowed) load: past the collectives of start-up, where a signal
        # handler cannot run until the peer it waits for answers. Rank 0 has written the run
        # record by then.
        when="test: loading takes .* on rank [01]",
        matches=processes,
        env={"OPENKD_TEST_SLOW_LOAD": "600"},
        timeout=300,
    )
    assert code == PREEMPTED, err[-3000:]
    lines = [line for line in err.splitlines() if "preempted" in line]
    assert lines == ["preempted before the first step: nothing to save; rerun the same command"], (
        err[-3000:]
    )
    assert "Traceback" not in err and not re.search(r"\bstep [1-9]", err), err[-3000:]
    assert not list(out.glob("checkpoint-*"))
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["status"] == "preempted"
    assert run["preempted"]["checkpoint"] is None and run["preempted"]["signal"] == "SIGTERM"


# --- fast: the pieces without training ---------------------------------------------------


def _callback(diverged: object = None):
    from types import SimpleNamespace

    from openkd.train.preempt import PreemptOnSignal

    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=1), guard=SimpleNamespace(diverged=diverged)
    )
    return PreemptOnSignal(trainer)


def _step_end(callback, step: int = 3, *, last: bool = False):
    from types import SimpleNamespace

    from transformers import TrainerControl

    control = TrainerControl(should_training_stop=last)
    callback.on_step_end(None, SimpleNamespace(global_step=step), control)
    return control


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_a_signal_asks_for_a_checkpoint_and_a_stop_at_the_step_end(sig: int) -> None:
    callback = _callback()
    before = signal.getsignal(sig)
    with callback.handling_signals():
        control = _step_end(callback, 2)
        assert not (control.should_save or control.should_training_stop)
        os.kill(os.getpid(), sig)  # only a flag: this process goes on
        control = _step_end(callback, 3)
    assert signal.getsignal(sig) is before  # the handler is removed after training
    assert callback.received == sig and callback.stopped_at == 3
    assert control.should_save and control.should_training_stop and not control.should_evaluate


def test_no_preemption_checkpoint_at_the_last_step_or_after_a_divergence() -> None:
    callback = _callback()
    callback.received = signal.SIGTERM
    control = _step_end(callback, 16, last=True)  # the run ends and saves its student anyway
    assert not control.should_save and callback.stopped_at is None

    diverged = _callback(diverged=object())  # openkd.train.guard: save nothing
    diverged.received = signal.SIGTERM
    control = _step_end(diverged)
    assert not control.should_save and diverged.stopped_at is None


def test_launcher_reports_the_preemption_its_workers_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind `accelerate launch` the workers' exit 75 is lost (the launcher exits 1 or
    128 + signal); a run record rewritten as preempted during the launch says it."""
    from openkd import versions
    from openkd.errors import Preempted
    from openkd.train import launch
    from openkd.train.config import TrainConfig
    from openkd.train.launch import relaunch_if_needed

    for name in (
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "ACCELERATE_MIXED_PRECISION",
        "OPENKD_LAUNCHED",
    ):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    record = out / "openkd_run.json"
    ckpt = out / "checkpoint-7"
    worker = (
        "import json, os, sys; assert 'SIGUSR1' in os.environ['PET_SIGNALS_TO_HANDLE']; "
        f"json.dump({{'status': 'preempted', 'preempted': {{'step': 7, 'checkpoint': {str(ckpt)!r}}}}}, "
        f"open({str(record)!r}, 'w')); sys.exit(143)"
    )
    monkeypatch.setattr(launch, "launch_command", lambda plan, argv: [sys.executable, "-c", worker])
    monkeypatch.setattr(versions, "check_trl", lambda: None)  # importing TRL takes seconds
    cfg = TrainConfig(student="s", dataset="d", output_dir=out, num_processes=2, bf16=False)
    with pytest.raises(Preempted) as info:
        relaunch_if_needed(cfg, [])
    assert info.value.exit_code == PREEMPTED == 75
    assert str(info.value) == (
        f"preempted at step 7: checkpoint saved to {ckpt}; rerun the same command to resume"
    )

    # The same record left by an earlier run, unchanged since: a failure is not a preemption.
    assert launch._record_since(out, launch._run_record_mtime(out)) is None


def test_cli_prints_the_preemption_as_one_line_and_exits_75(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from openkd.errors import Preempted
    from openkd.train import run as train_run
    from tests.helpers import invoke

    def preempted(cfg: object) -> None:
        raise Preempted(5, str(tmp_path / "checkpoint-5"))

    monkeypatch.setattr(train_run, "run", preempted)
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    code, stdout, stderr = invoke(
        "train", "--student", "s", "--dataset", str(data), "--output-dir", str(tmp_path / "o")
    )
    assert code == 75 and stdout == ""
    assert stderr.strip() == (
        f"preempted at step 5: checkpoint saved to {tmp_path / 'checkpoint-5'}; rerun the same "
        "command to resume"
    )


def test_openkd_run_passes_a_preempted_train_stage_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from openkd import pipeline
    from openkd.train import launch

    monkeypatch.setattr(launch, "run_child", lambda cmd, env=None: PREEMPTED)
    recipe = tmp_path / "recipe.yaml"
    with pytest.raises(pipeline.StageFailed) as info:
        pipeline._run_stage("train", tmp_path / "train.yaml", recipe, ["eval"])
    assert info.value.exit_code == PREEMPTED
    assert str(info.value) == (
        f"train was preempted (its checkpoint is saved); eval did not run; rerun `openkd run "
        f"{recipe}` to resume"
    )


def test_a_signal_before_training_raises_at_once_and_records_no_checkpoint(
    tmp_path: Path,
) -> None:
    from openkd.errors import PreemptedBeforeStart
    from openkd.train.preempt import PreemptOnSignal

    preempt = PreemptOnSignal()  # no trainer yet: loading
    preempt.run = (tmp_path, {"student": "s"})
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(PreemptedBeforeStart) as info, preempt.handling_signals():
        os.kill(os.getpid(), signal.SIGUSR1)
        raise AssertionError("the signal did not stop the loading")
    assert info.value.exit_code == PREEMPTED
    assert str(info.value) == (
        "preempted before the first step: nothing to save; rerun the same command"
    )
    assert signal.getsignal(signal.SIGUSR1) is before
    run = json.loads((tmp_path / "openkd_run.json").read_text())
    assert run["status"] == "preempted"
    assert run["preempted"] == {"step": None, "checkpoint": None, "signal": "SIGUSR1"}


# A stand-in for accelerate's launcher: starts a worker whose command line reads like
# `python -m openkd train`, notes any SIGTERM it gets itself, and exits with the worker's status.
FAKE_LAUNCHER = textwrap.dedent(
    """
    import signal, subprocess, sys
    signal.signal(signal.SIGTERM, lambda *_: open("launcher.got", "w").write("SIGTERM"))
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], "-m", "openkd", "train"])
    sys.exit(worker.wait())
    """
)
FAKE_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    def on_signal(signum, frame):
        open("worker.got", "w").write(signal.Signals(signum).name)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    worker = os.getpid()
    if os.fork() == 0:  # a data loader's worker: same command line, not to be signalled
        signal.signal(signal.SIGTERM, lambda *_: open("fork.got", "w").write("SIGTERM"))
        while os.getppid() == worker:
            time.sleep(0.05)
        os._exit(0)
    open("ready", "w").close()
    time.sleep(60)
    """
)
PARENT = textwrap.dedent(
    """
    import sys
    from openkd.train.launch import _WorkerSignals, run_child
    signals = _WorkerSignals()
    status = run_child([sys.executable, "-c", *sys.argv[1:]], forward=signals.forward)
    print("status", status, "preempting", signals.preempting, flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_openkd_passes_a_preemption_signal_to_its_workers_not_to_the_launcher(
    sig: int, tmp_path: Path
) -> None:
    """accelerate's plain launcher kills its worker 5 s after a SIGTERM, its elastic agent may
    print a traceback: `openkd train` signals the workers alone, and the launcher ends with them."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, FAKE_LAUNCHER, FAKE_WORKER],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline, "the fake worker did not start"
            time.sleep(0.05)
        parent.send_signal(sig)
        out, _ = parent.communicate(timeout=30)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert out.split() == ["status", "0", "preempting", "True"]
    assert (tmp_path / "worker.got").read_text() == signal.Signals(sig).name
    assert not (tmp_path / "launcher.got").exists()
    assert not (tmp_path / "fork.got").exists()
