"""Multi-process training: `openkd train --deepspeed zero3 --num-processes 8` relaunches itself.

When a launch setting is given and this process is not already one of a launcher's workers,
openkd runs `python -m accelerate.commands.launch --config_file CFG ... -m openkd train ARGS`
as a child, forwards signals to it (SIGTERM/SIGUSR1 to its workers alone) and exits with its
status, or 75 when the workers recorded a preemption. Running
`accelerate launch -m openkd train ...` yourself works too: the workers see the launcher's
environment and train in place. Under Slurm a multi-node config takes the node count, the
process count (nodes x GPUs per node) and the node's rank from the job; flags still win.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openkd import console
from openkd.errors import PREEMPTED, OpenkdError, Preempted, PreemptedBeforeStart
from openkd.system import dies_with_us, free_port
from openkd.train.config import TrainConfig

SHIPPED_CONFIGS = ("zero3", "zero3_offload", "zero2", "ddp", "multinode_zero3")
DEEPSPEED_CONFIGS = ("zero3", "zero3_offload", "zero2", "multinode_zero3")
# Set in the relaunched workers' environment, so they never relaunch again.
LAUNCHED_ENV = "OPENKD_LAUNCHED"
# Set by torchrun / the DeepSpeed launcher (LOCAL_RANK...) or by every accelerate launcher.
_LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")
_FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
_PREEMPTION_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}
# SIGTERM/SIGUSR1 reaching `openkd train` go to its workers only, never to accelerate's launcher:
# its plain launcher kills a worker 5 s after a SIGTERM (too soon to finish a step and save),
# and its elastic agent may print a traceback. Should the launcher be signalled directly (a
# scheduler signalling every process), its elastic agent (torch.distributed.run, whose flags
# read PET_* variables) passes SIGTERM and, with this, SIGUSR1 on to the workers and waits up to
# 10 minutes for their checkpoint, not 30 s.
_PREEMPTION_ENV = {
    "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600",
}
# Multi-node placement, from the first variable set (openkd's own name, then torchrun/SLURM).
_NODE_ENV = {
    "machine_rank": ("MACHINE_RANK", "SLURM_NODEID"),
    "main_process_ip": ("MAIN_PROCESS_IP", "MASTER_ADDR"),
    "main_process_port": ("MAIN_PROCESS_PORT", "MASTER_PORT"),
    "num_machines": ("NUM_MACHINES",),
}
# A Slurm job's node count (batch script and job steps alike).
_SLURM_NODES = ("SLURM_NNODES", "SLURM_JOB_NUM_NODES")


class LaunchError(OpenkdError):
    """The launched workers failed; the process exits with their status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class LaunchPlan:
    """What `accelerate launch` is given: a config file and/or launch flags."""

    config_file: Path | None
    args: list[str] = field(default_factory=list)


def shipped_configs_dir(package_dir: Path | None = None) -> Path:
    """`openkd/configs/accelerate` in an installed wheel, `<repo>/configs/accelerate` in a checkout."""
    package = package_dir or Path(__file__).resolve().parent.parent
    for candidate in (
        package / "configs" / "accelerate",
        package.parent / "configs" / "accelerate",
    ):
        if candidate.is_dir():
            return candidate
    raise OpenkdError(
        "openkd's shipped accelerate configs are missing from this install; reinstall openkd "
        "or pass the path of an accelerate YAML file to --accelerate-config"
    )


def resolve_accelerate_config(name_or_path: str) -> Path:
    """A shipped config name (zero3, zero3_offload, zero2, ddp, multinode_zero3) or a YAML path."""
    if name_or_path in SHIPPED_CONFIGS:
        path = shipped_configs_dir() / f"{name_or_path}.yaml"
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise OpenkdError(
            f"accelerate config {name_or_path} not found; pass the path of an accelerate YAML "
            f"file or one of the shipped names: {', '.join(SHIPPED_CONFIGS)}"
        )
    read_accelerate_config(path)
    return path.resolve()


def read_accelerate_config(path: Path) -> dict[str, Any]:
    """The YAML mapping of an accelerate config, or a one-line error saying what is wrong."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise OpenkdError(
            f"accelerate config {path} is not readable YAML; fix it or pass one of the shipped "
            f"names: {', '.join(SHIPPED_CONFIGS)}"
        ) from err
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise OpenkdError(
            f"{path} is not an accelerate config (no distributed_type); write one with "
            f"`accelerate config` or pass one of the shipped names: {', '.join(SHIPPED_CONFIGS)}"
        )
    return data


def is_launched(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """True inside a worker started by openkd, accelerate, torchrun or deepspeed."""
    env = os.environ if env is None else env
    return LAUNCHED_ENV in env or any(name in env for name in _LAUNCHER_ENV)


def launch_plan(cfg: TrainConfig, env: dict[str, str] | None = None) -> LaunchPlan | None:
    """How to launch `cfg`'s workers, or None when one plain process is what was asked for."""
    env = dict(os.environ if env is None else env)
    if cfg.deepspeed:
        plan = _deepspeed_plan(cfg.deepspeed)
    elif cfg.accelerate_config:
        plan = LaunchPlan(resolve_accelerate_config(cfg.accelerate_config))
    elif cfg.num_processes and cfg.num_processes > 1:
        plan = LaunchPlan(resolve_accelerate_config("ddp"))
    else:
        return None
    args = list(plan.args)
    settings = read_accelerate_config(plan.config_file) if plan.config_file else {}
    nodes = slurm_nodes(settings, env)
    num_processes = cfg.num_processes
    if num_processes is None and nodes is not None:
        num_processes = _slurm_processes(int(env.get("NUM_MACHINES") or nodes), env)
    if num_processes:
        args += ["--num_processes", str(num_processes)]
    precision = mixed_precision(cfg.bf16)
    if precision is not None:
        args += ["--mixed_precision", precision]
    args += _node_args(settings, env, plan.config_file, nodes)
    return LaunchPlan(plan.config_file, args)


def slurm_nodes(settings: dict[str, Any], env: dict[str, str]) -> int | None:
    """The Slurm job's node count when a multi-node config runs under Slurm, else None.

    A single-node config keeps its one machine even inside a multi-node job."""
    if int(settings.get("num_machines") or 1) <= 1:
        return None
    name = next((name for name in _SLURM_NODES if env.get(name)), None)
    return None if name is None else _count(env[name], name)


def gpus_per_node(env: dict[str, str]) -> int:
    """GPUs on this node: Slurm's count for the step or job, else CUDA_VISIBLE_DEVICES, else
    what torch sees."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return _count(env["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE")
    if env.get("SLURM_GPUS_PER_NODE"):  # --gpus-per-node: [type:]count[,[type:]count...]
        items = env["SLURM_GPUS_PER_NODE"].split(",")
        return sum(_count(item.rsplit(":", 1)[-1], "SLURM_GPUS_PER_NODE") for item in items)
    if "CUDA_VISIBLE_DEVICES" in env:
        from openkd.generate.vllm.gpus import parse_visible_devices

        return len(parse_visible_devices(env["CUDA_VISIBLE_DEVICES"]))
    return _cuda_device_count()


def _slurm_processes(machines: int, env: dict[str, str]) -> int:
    per_node = gpus_per_node(env)
    if per_node < 1:
        raise OpenkdError(
            f"under Slurm ({machines} nodes) openkd cannot tell how many GPUs a node has "
            "(no SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE or CUDA_VISIBLE_DEVICES, and torch "
            "sees none); ask Slurm for GPUs (--gpus-per-node) or pass --num-processes with the "
            "total over all nodes"
        )
    console.info(
        f"under Slurm: {machines} nodes x {per_node} GPUs -> --num_machines {machines} "
        f"--num_processes {machines * per_node} (--num-processes overrides)"
    )
    return machines * per_node


def _count(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise OpenkdError(
            f"{name}={value!r} is not a number; unset it or set it to a count"
        ) from None


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()  # NVML based: no CUDA context in this process


def _deepspeed_plan(value: str) -> LaunchPlan:
    """`--deepspeed`: a shipped DeepSpeed name, an accelerate YAML, or a DeepSpeed JSON file."""
    if value == "ddp":
        raise OpenkdError(
            "--deepspeed ddp: ddp is not a DeepSpeed config; pass --accelerate-config ddp, or "
            f"--deepspeed with one of {', '.join(DEEPSPEED_CONFIGS)}"
        )
    path = Path(value).expanduser()
    if value not in SHIPPED_CONFIGS and path.suffix == ".json":
        if not path.is_file():
            raise OpenkdError(
                f"DeepSpeed config {value} not found; pass an existing DeepSpeed JSON file or "
                f"one of the shipped names: {', '.join(DEEPSPEED_CONFIGS)}"
            )
        return LaunchPlan(None, ["--use_deepspeed", "--deepspeed_config_file", str(path.resolve())])
    config = resolve_accelerate_config(value)
    if read_accelerate_config(config).get("distributed_type") != "DEEPSPEED":
        raise OpenkdError(
            f"--deepspeed {value}: {config} is not a DeepSpeed config (distributed_type is not "
            "DEEPSPEED); pass it with --accelerate-config instead"
        )
    return LaunchPlan(config)


def mixed_precision(bf16: bool | None) -> str | None:
    """The launcher's --mixed_precision: openkd's --bf16 decides, not the YAML.

    accelerate's ACCELERATE_MIXED_PRECISION wins over TrainingArguments(bf16=False), so the
    launcher must be told. Auto (None) keeps the config's setting on a GPU node and turns
    mixed precision off on a machine without CUDA (a bf16 YAML would otherwise run bf16 on CPU).
    """
    if bf16 is None:
        return None if _cuda_available() else "no"
    return "bf16" if bf16 else "no"


def _cuda_available() -> bool:
    import torch

    # Counts devices without creating a CUDA context in this (parent) process.
    return torch.cuda.is_available()


def _node_args(
    settings: dict[str, Any], env: dict[str, str], config: Path | None, nodes: int | None = None
) -> list[str]:
    """Multi-node placement from the environment (`nodes`: the Slurm job's node count); a free
    local port for single-node runs."""
    found = {
        key: next((env[name] for name in names if env.get(name)), None)
        for key, names in _NODE_ENV.items()
    }
    num_machines = int(found["num_machines"] or nodes or settings.get("num_machines") or 1)
    if num_machines <= 1:
        port = found["main_process_port"] or settings.get("main_process_port")
        # Two runs on one node must not both try accelerate's default port 29500.
        return ["--main_process_port", str(port or free_port())]
    # The shipped example holds placeholders; a user's own config may hold real values.
    placeholder = config is not None and config.parent == shipped_configs_dir()
    missing = [
        _NODE_ENV[key][0]
        for key in ("machine_rank", "main_process_ip")
        if not found[key] and (placeholder or settings.get(key) is None)
    ]
    if missing:
        raise OpenkdError(
            f"{config} runs on {num_machines} machines: set {' and '.join(missing)} on every "
            "node (this node's rank, 0 on the first; the first node's address), or launch "
            "with `accelerate launch --machine_rank R --main_process_ip IP ...`"
        )
    rank = found["machine_rank"]
    if rank is not None and not 0 <= _count(rank, "the machine rank") < num_machines:
        source = next(name for name in _NODE_ENV["machine_rank"] if env.get(name))
        raise OpenkdError(
            f"this node's rank {rank} ({source}) is outside 0..{num_machines - 1} for "
            f"{num_machines} machines; set NUM_MACHINES to the number of nodes"
        )
    args = ["--num_machines", str(num_machines)]
    for key in ("machine_rank", "main_process_ip", "main_process_port"):
        if found[key]:
            args += [f"--{key}", str(found[key])]
    return args


def launch_command(plan: LaunchPlan, argv: list[str]) -> list[str]:
    """The child command line: accelerate's launcher running `openkd train` with `argv`."""
    # Callers may pass everything after the program name; the command is added here.
    train_args = argv[1:] if argv[:1] == ["train"] else list(argv)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if plan.config_file is not None:
        cmd += ["--config_file", str(plan.config_file)]
    return [*cmd, *plan.args, "-m", "openkd", "train", *train_args]


def relaunch_if_needed(cfg: TrainConfig, argv: list[str]) -> bool:
    """Relaunch `openkd train argv` under `accelerate launch` if asked and not yet launched.

    Returns True when the launched run finished (the caller then returns), False when this
    process should train itself. A failed launch raises OpenkdError with the workers' status.
    """
    if not (cfg.accelerate_config or cfg.deepspeed or cfg.num_processes):
        return False
    if is_launched():
        _check_launched_world(cfg.num_processes, os.environ)
        return False
    plan = launch_plan(cfg)
    if plan is None:
        return False
    from openkd.versions import check_trl

    check_trl()  # one line here rather than the same error from every worker
    cmd = launch_command(plan, argv)
    console.info(f"launching: python {shlex.join(cmd[1:])}")
    record_before = _run_record_mtime(cfg.output_dir)
    signals = _WorkerSignals()
    env = {**_PREEMPTION_ENV, **os.environ, LAUNCHED_ENV: "1"}
    status = run_child(cmd, env=env, forward=signals.forward)
    # Preempted workers exit 0 (openkd.cli): their run record says what happened.
    record = _record_since(cfg.output_dir, record_before)
    preempted = _preempted(record)
    if preempted is not None:
        raise preempted
    completed = (record or {}).get("status") == "complete"  # it ended at its last step
    if signals.preempting and not completed and (status == 0 or signals.before_workers):
        raise PreemptedBeforeStart()  # no worker had reached the training loop
    if status == 0:
        return True
    raise _failure(status)


def _run_record_mtime(output_dir: Path) -> int | None:
    from openkd.train.runinfo import RUN_FILE

    try:
        return (output_dir / RUN_FILE).stat().st_mtime_ns
    except OSError:
        return None


def _record_since(output_dir: Path, mtime_ns: int | None) -> dict[str, Any] | None:
    """The run record, if the workers rewrote it since the launch (`mtime_ns`: its
    modification time before it)."""
    from openkd.train.runinfo import read_run

    if _run_record_mtime(output_dir) in (None, mtime_ns):
        return None
    try:
        return read_run(output_dir)
    except OpenkdError:
        return None


def _preempted(record: dict[str, Any] | None) -> Preempted | None:
    """The preemption a run record tells of: with a checkpoint, or before the first step."""
    found = (record or {}).get("preempted")
    if (record or {}).get("status") != "preempted" or not isinstance(found, dict):
        return None
    if not found.get("checkpoint"):
        return PreemptedBeforeStart()
    return Preempted(int(found.get("step") or 0), str(found["checkpoint"]))


class _WorkerSignals:
    """Sends SIGTERM/SIGUSR1 to the launcher's workers, and any other signal to the launcher's
    process group; remembers whether a preemption signal came, and whether it came before any
    worker had started (the launcher's group was then stopped: nothing to save)."""

    def __init__(self) -> None:
        self.preempting = False
        self.before_workers = False

    def forward(self, launcher: int, signum: int) -> None:
        workers = _workers(launcher) if signum in _PREEMPTION_SIGNALS else []
        if signum in _PREEMPTION_SIGNALS:
            self.preempting = True
            self.before_workers = self.before_workers or not workers
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher, signal.SIGTERM if signum == signal.SIGUSR1 else signum)


def _workers(launcher: int) -> list[int]:
    """The pids of the `python -m openkd` processes the launcher started (not their own
    children: a data loader's forked workers run the same command line)."""
    import psutil

    found: list[int] = []
    try:
        todo = psutil.Process(launcher).children()
    except psutil.Error:
        return found
    while todo:
        process = todo.pop()
        try:
            args = process.cmdline()
            if "-m" in args and args[args.index("-m") + 1 :][:1] == ["openkd"]:
                found.append(process.pid)
            else:
                todo.extend(process.children())
        except psutil.Error:
            continue
    return found


def _check_launched_world(num_processes: int | None, env: Any) -> None:
    """Under someone else's launcher its process count wins; say so when it differs."""
    if not num_processes or num_processes == 1:
        return
    world = env.get("WORLD_SIZE")
    if world is None:
        console.warn(
            f"--num-processes {num_processes} is ignored: the environment looks like a launcher's "
            "(ACCELERATE_* or OPENKD_LAUNCHED set, no WORLD_SIZE), so this one process trains "
            "alone; unset those variables to let openkd launch the processes"
        )
    elif world != str(num_processes):
        console.warn(
            f"--num-processes {num_processes} is ignored: the launcher started {world} "
            "processes, and those train"
        )


def _failure(status: int) -> BaseException:
    if status in (-signal.SIGINT, 128 + signal.SIGINT):
        return KeyboardInterrupt()
    if status < 0:
        name = signal.Signals(-status).name
        return LaunchError(
            f"the training processes were stopped by {name}; rerun the same command to resume "
            "from the last checkpoint",
            128 - status,
        )
    return LaunchError(
        f"training under `accelerate launch` failed (exit code {status}); the failing "
        "process's error is printed above",
        status,
    )


def run_child(
    cmd: list[str],
    env: dict[str, str] | None = None,
    forward: Callable[[int, int], None] | None = None,
) -> int:
    """Run `cmd` in its own process group, forwarding signals to it; return its exit status.

    The child gets each signal exactly once: a terminal's Ctrl-C reaches only this process,
    which passes it on (`forward(child_pid, signum)` does it instead, when given). If this
    process is killed outright, Linux sends the child SIGTERM. A child that fails after a
    forwarded SIGINT/SIGTERM/SIGHUP/SIGQUIT reads as killed by it (-signal), whatever status
    the launcher exited with; a preempted one's 75 is kept.
    """
    child = subprocess.Popen(dies_with_us(cmd), env=env, start_new_session=True)
    received: list[int] = []

    def to_group(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    deliver = forward or to_group

    def on_signal(signum: int, _frame: Any) -> None:
        if signum in _STOP_SIGNALS:
            received.append(signum)
        deliver(child.pid, signum)

    previous = {}
    for name in _FORWARDED_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, on_signal)
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status not in (0, PREEMPTED) and received:
        # Report the signal the user sent, not how the launcher chose to exit on it.
        return -received[-1]
    return status


def distributed_training_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Extra SFTConfig/TrainingArguments fields a launched worker needs (empty when none).

    Under `accelerate launch` with a DeepSpeed YAML, TrainingArguments builds its DeepSpeed
    plugin from the launcher's environment, so nothing is needed. A DeepSpeed JSON given with
    `--deepspeed FILE.json` is passed on as `deepspeed=`, which HF documents and which fills
    its "auto" values from the training arguments.
    """
    kwargs: dict[str, Any] = {}
    if cfg.deepspeed and cfg.deepspeed.endswith(".json"):
        kwargs["deepspeed"] = str(Path(cfg.deepspeed).expanduser().resolve())
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    wanted = mixed_precision(cfg.bf16)
    if launched == "bf16" and wanted == "no":
        console.warn(
            "the accelerate config turns on bf16 mixed precision, but "
            + ("--no-bf16 was passed" if cfg.bf16 is False else "there is no CUDA GPU")
            + "; accelerate's setting wins. Set mixed_precision: 'no' in the config, or let "
            "openkd launch the run (`openkd train --accelerate-config ...`), to train in float32"
        )
    return kwargs
