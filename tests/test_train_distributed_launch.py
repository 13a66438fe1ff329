"""How `openkd train` relaunches itself under `accelerate launch` (fast: no training here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from openkd.errors import OpenkdError, Preempted, PreemptedBeforeStart
from openkd.train import launch
from openkd.train.config import TrainConfig
from openkd.train.launch import (
    LAUNCHED_ENV,
    LaunchError,
    LaunchPlan,
    is_launched,
    launch_command,
    launch_plan,
    relaunch_if_needed,
    run_child,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(student="s", dataset="d", **kw)


@pytest.fixture
def no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", LAUNCHED_ENV):
        monkeypatch.delenv(name, raising=False)


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_plain_run_is_not_relaunched(no_launcher_env: None) -> None:
    assert launch_plan(_cfg()) is None
    assert launch_plan(_cfg(num_processes=1)) is None
    assert relaunch_if_needed(_cfg(), ["--student", "s"]) is False


def test_deepspeed_name_plan(no_launcher_env: None) -> None:
    plan = launch_plan(_cfg(deepspeed="zero3", num_processes=2, bf16=False), env={})
    assert plan is not None
    assert plan.config_file == (CONFIG_DIR / "zero3.yaml").resolve()
    assert _flag(plan.args, "--num_processes") == "2"
    assert _flag(plan.args, "--mixed_precision") == "no"
    # A free port, so two runs on one node do not collide on 29500.
    assert int(_flag(plan.args, "--main_process_port") or 0) > 0


def test_bf16_flag_decides_mixed_precision(no_launcher_env: None) -> None:
    plan = launch_plan(_cfg(accelerate_config="zero2", bf16=True), env={})
    assert plan is not None and _flag(plan.args, "--mixed_precision") == "bf16"
    assert "--num_processes" not in plan.args  # the config's own count


def test_bf16_auto_without_cuda_turns_mixed_precision_off(
    no_launcher_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "_cuda_available", lambda: False)
    plan = launch_plan(_cfg(deepspeed="zero3"), env={})
    assert plan is not None and _flag(plan.args, "--mixed_precision") == "no"
    monkeypatch.setattr(launch, "_cuda_available", lambda: True)
    plan = launch_plan(_cfg(deepspeed="zero3"), env={})
    assert plan is not None and "--mixed_precision" not in plan.args  # the YAML's bf16


def test_num_processes_alone_uses_ddp(no_launcher_env: None) -> None:
    plan = launch_plan(_cfg(num_processes=4, bf16=False), env={})
    assert plan is not None
    assert plan.config_file == (CONFIG_DIR / "ddp.yaml").resolve()
    assert _flag(plan.args, "--num_processes") == "4"


def test_explicit_port_is_kept(no_launcher_env: None) -> None:
    plan = launch_plan(_cfg(deepspeed="zero3", bf16=False), env={"MASTER_PORT": "29777"})
    assert plan is not None and _flag(plan.args, "--main_process_port") == "29777"


def test_deepspeed_json(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    plan = launch_plan(_cfg(deepspeed=str(ds), num_processes=2, bf16=False), env={})
    assert plan is not None and plan.config_file is None
    assert plan.args[:3] == ["--use_deepspeed", "--deepspeed_config_file", str(ds.resolve())]
    assert launch.distributed_training_kwargs(_cfg(deepspeed=str(ds))) == {
        "deepspeed": str(ds.resolve())
    }
    with pytest.raises(OpenkdError, match=r"DeepSpeed config .*missing\.json not found"):
        launch_plan(_cfg(deepspeed=str(tmp_path / "missing.json")), env={})


def test_deepspeed_rejects_non_deepspeed_configs() -> None:
    with pytest.raises(OpenkdError, match="pass --accelerate-config ddp"):
        launch_plan(_cfg(deepspeed="ddp"), env={})
    with pytest.raises(OpenkdError, match="not a DeepSpeed config"):
        launch_plan(_cfg(deepspeed=str(CONFIG_DIR / "ddp.yaml")), env={})


def test_missing_accelerate_config_is_one_line_error() -> None:
    with pytest.raises(OpenkdError) as info:
        launch_plan(_cfg(accelerate_config="missing.yaml"), env={})
    assert str(info.value) == (
        "accelerate config missing.yaml not found; pass the path of an accelerate YAML file "
        "or one of the shipped names: zero3, zero3_offload, zero2, ddp, multinode_zero3"
    )


def test_multinode_needs_rank_and_address() -> None:
    cfg = _cfg(deepspeed="multinode_zero3", bf16=True)
    with pytest.raises(OpenkdError) as info:
        launch_plan(cfg, env={})
    assert "set MACHINE_RANK and MAIN_PROCESS_IP on every node" in str(info.value)

    plan = launch_plan(cfg, env={"MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.1.2.3"})
    assert plan is not None
    assert _flag(plan.args, "--num_machines") == "2"
    assert _flag(plan.args, "--machine_rank") == "1"
    assert _flag(plan.args, "--main_process_ip") == "10.1.2.3"

    # torchrun / SLURM names work too.
    slurm = {"SLURM_NODEID": "3", "MASTER_ADDR": "node-a", "MASTER_PORT": "6000"}
    plan = launch_plan(cfg, env={**slurm, "NUM_MACHINES": "4"})
    assert plan is not None
    assert _flag(plan.args, "--num_machines") == "4"
    assert _flag(plan.args, "--machine_rank") == "3"
    assert _flag(plan.args, "--main_process_ip") == "node-a"
    assert _flag(plan.args, "--main_process_port") == "6000"


def test_own_multinode_config_may_hold_real_values(tmp_path: Path) -> None:
    own = tmp_path / "cluster.yaml"
    own.write_text((CONFIG_DIR / "multinode_zero3.yaml").read_text())
    plan = launch_plan(_cfg(accelerate_config=str(own), bf16=True), env={})
    assert plan is not None and "--machine_rank" not in plan.args


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, False),
        ({"LOCAL_RANK": "0"}, True),
        ({"WORLD_SIZE": "2", "RANK": "1"}, True),
        ({"ACCELERATE_MIXED_PRECISION": "no"}, True),  # accelerate's single-process launcher
        ({LAUNCHED_ENV: "1"}, True),
        ({"ACCELERATE_LOG_LEVEL": "info", "MASTER_ADDR": "x"}, False),
    ],
)
def test_is_launched(env: dict[str, str], expected: bool) -> None:
    assert is_launched(env) is expected


def test_under_a_launcher_trains_in_place(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert relaunch_if_needed(_cfg(deepspeed="zero3", num_processes=2), []) is False
    assert "warning" not in capsys.readouterr().err

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert relaunch_if_needed(_cfg(deepspeed="zero3", num_processes=2), []) is False
    err = " ".join(capsys.readouterr().err.split())
    assert "--num-processes 2 is ignored: the launcher started 4 processes" in err


def test_stray_accelerate_variable_is_reported(
    no_launcher_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # exported in a shell profile
    assert relaunch_if_needed(_cfg(num_processes=2), []) is False
    err = " ".join(capsys.readouterr().err.split())
    assert "--num-processes 2 is ignored" in err
    assert "unset those variables" in err


def test_launch_command() -> None:
    plan = LaunchPlan(Path("/c/zero3.yaml"), ["--num_processes", "2"])
    argv = ["--student", "s", "--dataset", "d", "--deepspeed", "zero3"]
    expected = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "/c/zero3.yaml",
        "--num_processes",
        "2",
        "-m",
        "openkd",
        "train",
        *argv,
    ]
    assert launch_command(plan, argv) == expected
    # sys.argv[1:] (with the command name) works as well as sys.argv[2:].
    assert launch_command(plan, ["train", *argv]) == expected


def test_failed_launch_raises_with_the_workers_exit_code(
    no_launcher_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}

    def fake_command(plan: LaunchPlan, argv: list[str]) -> list[str]:
        seen["argv"] = argv
        code = "import os, sys; sys.exit(3 if os.environ.get('OPENKD_LAUNCHED') == '1' else 9)"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(launch, "launch_command", fake_command)
    cfg = _cfg(deepspeed="zero3", num_processes=2, bf16=False)
    with pytest.raises(LaunchError) as info:
        relaunch_if_needed(cfg, ["--student", "s"])
    assert info.value.exit_code == 3  # the child saw OPENKD_LAUNCHED and exited 3
    assert "failed (exit code 3)" in str(info.value)
    assert seen["argv"] == ["--student", "s"]

    monkeypatch.setattr(launch, "launch_command", lambda p, a: [sys.executable, "-c", "pass"])
    assert relaunch_if_needed(cfg, []) is True


def test_run_child_status() -> None:
    assert run_child([sys.executable, "-c", "import sys; sys.exit(5)"]) == 5
    assert run_child([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]) == -9
    killed = launch._failure(-signal.SIGTERM)
    assert isinstance(killed, LaunchError) and killed.exit_code == 143
    assert "stopped by SIGTERM; rerun the same command to resume" in str(killed)
    assert isinstance(launch._failure(-signal.SIGINT), KeyboardInterrupt)
    assert isinstance(launch._failure(130), KeyboardInterrupt)


PARENT = textwrap.dedent(
    """
    import sys
    from openkd.train.launch import run_child
    child = [sys.executable, "-c", sys.argv[1], sys.argv[2]]
    print("status", run_child(child), flush=True)
    """
)

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    marker = sys.argv[1]
    def on_term(signum, frame):
        open(marker, "w").write(signal.Signals(signum).name)
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    open(marker + ".ready", "w").close()
    time.sleep(60)
    """
)


def _start_parent(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "marker"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "marker.ready").exists():
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.05)
    return parent, marker


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_the_launched_child(tmp_path: Path, sig: int) -> None:
    parent, marker = _start_parent(tmp_path)
    parent.send_signal(sig)
    out, _ = parent.communicate(timeout=30)
    assert marker.read_text() == signal.Signals(sig).name
    # The child handled it and failed (exit 7): reported as stopped by the signal sent.
    assert f"status {-sig}" in out


def test_child_is_stopped_when_the_parent_is_killed(tmp_path: Path) -> None:
    parent, marker = _start_parent(tmp_path)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "orphaned child was not stopped"
        time.sleep(0.05)
    assert marker.read_text() == "SIGTERM"


def test_cli_missing_accelerate_config(tiny_model: Path, tmp_path: Path) -> None:
    """Refused before any process is launched or any weight is loaded."""
    from tests.conftest import run_cli
    from tests.train_helpers import write_reverse_dataset

    data = write_reverse_dataset(tmp_path / "train.jsonl", rows=4)
    proc = run_cli(
        "train",
        "--student", tiny_model,
        "--dataset", data,
        "--output-dir", tmp_path / "out",
        "--accelerate-config", "missing.yaml",
        "--num-processes", "2",
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: accelerate config missing.yaml not found; pass the path of an accelerate YAML "
        "file or one of the shipped names: zero3, zero3_offload, zero2, ddp, multinode_zero3"
    )
    assert not (tmp_path / "out").exists()


SLURM_NODE_2_OF_4 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_GPUS_ON_NODE": "8",
    "MASTER_ADDR": "gpu001",
    "MASTER_PORT": "29500",
}


def test_multinode_under_slurm_takes_the_world_from_the_job(no_launcher_env: None) -> None:
    """4 nodes x 8 GPUs: 4 machines and 32 processes, whatever the YAML's 2 x 16 says."""
    from accelerate.commands.launch import launch_command_parser

    cfg = _cfg(deepspeed="multinode_zero3", bf16=True)
    plan = launch_plan(cfg, env=SLURM_NODE_2_OF_4)
    assert plan is not None
    args = launch_command_parser().parse_args(launch_command(plan, ["train", "--student", "s"])[3:])
    assert (args.num_machines, args.num_processes, args.machine_rank) == (4, 32, 2)
    assert (args.main_process_ip, args.main_process_port) == ("gpu001", 29500)
    assert args.module and args.training_script == "openkd"


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, 32),
        ({"SLURM_GPUS_PER_NODE": "4"}, 16),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 16),
    ],
)
def test_gpus_per_node_from_the_other_slurm_and_cuda_variables(
    no_launcher_env: None, gpus: dict[str, str], expected: int
) -> None:
    env = {k: v for k, v in SLURM_NODE_2_OF_4.items() if k != "SLURM_GPUS_ON_NODE"}
    plan = launch_plan(_cfg(deepspeed="multinode_zero3", bf16=True), env={**env, **gpus})
    assert plan is not None and _flag(plan.args, "--num_processes") == str(expected)


def test_explicit_settings_win_over_slurm(no_launcher_env: None) -> None:
    cfg = _cfg(deepspeed="multinode_zero3", bf16=True, num_processes=12)
    plan = launch_plan(cfg, env={**SLURM_NODE_2_OF_4, "NUM_MACHINES": "3"})
    assert plan is not None
    assert _flag(plan.args, "--num_processes") == "12"
    assert _flag(plan.args, "--num_machines") == "3"
    # NUM_MACHINES alone: processes follow it.
    plan = launch_plan(
        _cfg(deepspeed="multinode_zero3", bf16=True), {**SLURM_NODE_2_OF_4, "NUM_MACHINES": "3"}
    )
    assert plan is not None and _flag(plan.args, "--num_processes") == "24"


def test_single_node_config_ignores_a_multinode_slurm_job(no_launcher_env: None) -> None:
    plan = launch_plan(_cfg(deepspeed="zero3", bf16=True), env=SLURM_NODE_2_OF_4)
    assert plan is not None
    assert "--num_machines" not in plan.args and "--num_processes" not in plan.args


def test_rank_outside_the_machines_is_refused(no_launcher_env: None) -> None:
    env = {**SLURM_NODE_2_OF_4, "NUM_MACHINES": "2"}
    with pytest.raises(OpenkdError) as info:
        launch_plan(_cfg(deepspeed="multinode_zero3", bf16=True, num_processes=16), env=env)
    assert str(info.value) == (
        "this node's rank 2 (SLURM_NODEID) is outside 0..1 for 2 machines; set NUM_MACHINES "
        "to the number of nodes"
    )


def test_slurm_without_a_gpu_count_says_how_to_fix_it(
    no_launcher_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "_cuda_device_count", lambda: 0)
    env = {k: v for k, v in SLURM_NODE_2_OF_4.items() if k != "SLURM_GPUS_ON_NODE"}
    with pytest.raises(OpenkdError, match="pass --num-processes with the total over all nodes"):
        launch_plan(_cfg(deepspeed="multinode_zero3", bf16=True), env=env)


@pytest.mark.parametrize(
    ("raised", "released"),
    [
        (None, True),
        (Preempted(3, "out/checkpoint-3"), True),  # every rank passed the preemption barrier
        (PreemptedBeforeStart(), False),
        (RuntimeError("a rank failed"), False),  # another rank may be inside a collective
    ],
    ids=["finished", "preempted", "preempted-while-loading", "failed"],
)
def test_process_group_is_destroyed_when_training_ends_together(
    raised: Exception | None, released: bool, tmp_path: Path
) -> None:
    """A process group left to interpreter exit can abort a finished worker (gloo's threads:
    SIGABRT, "terminate called without an active exception"); one destroyed after a failure
    could hang the ranks still in a collective."""
    import torch.distributed as dist

    from openkd.train.run import _process_group_released

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with (
            contextlib.suppress(type(raised) if raised else ()),
            _process_group_released() as group,
        ):
            if raised is not None:
                raise raised
        assert dist.is_initialized() is not released
        assert group.released is released  # a worker then exits without the teardown
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
