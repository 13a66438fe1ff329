"""The Slurm scripts run end to end, with stand-ins only for what needs a cluster or a GPU.

Array tasks and the merge job run for real (bash + openkd with the mock teacher), including a
task that gets Slurm's time-limit warning (USR1), stops cleanly, requeues itself and resumes.
`sbatch`, `srun`, `scontrol`, `accelerate`, `curl` and the vLLM server are small stand-in
scripts that record how they were called.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import read_jsonl, write_jsonl
from tests.helpers import error_line

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "configs" / "slurm"
VENV_BIN = Path(sys.executable).parent

STUBS = {
    # Records every call; `show hostnames` prints two nodes.
    "scontrol": """#!/bin/bash
echo "$*" >> "$STUB_LOG/scontrol"
if [[ "$1 $2" == "show hostnames" ]]; then echo gpu001; echo gpu002; fi
""",
    # Records the call and prints a job id in --parsable form ("id;cluster").
    "sbatch": """#!/bin/bash
echo "$*" >> "$STUB_LOG/sbatch"
n=$(wc -l < "$STUB_LOG/sbatch")
echo "$((1000 + n));cluster"
""",
    # Runs the command once per node, with that node's SLURM_NODEID, as srun does in parallel.
    "srun": """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit $?; done
""",
    "accelerate": """#!/bin/bash
printf '%s\\0' "$@" > "$STUB_LOG/accelerate.$SLURM_NODEID"
""",
    "curl": """#!/bin/bash
echo "$*" >> "$STUB_LOG/curl"
""",
    # `vllm serve` is a sleeping stand-in; any other python call is the real interpreter.
    "python": f"""#!/bin/bash
if [[ "$1" == -m && "$3" == serve ]]; then
  printf '%s\\0' "${{@:4}}" > "$STUB_LOG/vllm-args"
  echo "$2" > "$STUB_LOG/vllm-module"
  echo $$ > "$STUB_LOG/vllm-pid"
  exec sleep 600
fi
exec {sys.executable} "$@"
""",
}


def make_stubs(directory: Path, names: list[str], extra: dict[str, str] | None = None) -> Path:
    """Stand-ins in `directory`; they record their calls in `log_dir(directory)`."""
    directory.mkdir(parents=True, exist_ok=True)
    log_dir(directory).mkdir(exist_ok=True)
    for name in names:
        path = directory / name
        path.write_text({**STUBS, **(extra or {})}[name])
        path.chmod(0o755)
    return directory


def log_dir(stubs: Path) -> Path:
    return stubs.with_name(stubs.name + "-calls")


def run_script(
    script: Path, env: dict[str, str], stubs: Path, cwd: Path = ROOT, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin:/bin",
        "STUB_LOG": str(log_dir(stubs)),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "4242",
        **env,
    }
    return subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    from openkd.tiny import make_prompts

    path = tmp_path_factory.mktemp("slurm") / "prompts.jsonl"
    return write_jsonl(path, [{"prompt": p} for p in make_prompts(120, seed=3)])


def mock_config(path: Path, prompts: Path, output: Path, **extra) -> Path:
    section = {
        "backend": "mock",
        "teacher": "mock-teacher",
        "dataset": str(prompts),
        "output": str(output),
        "concurrency": 8,
        **extra,
    }
    path.write_text(yaml.safe_dump({"generate": section}))
    return path


def ids(path: Path) -> list[str]:
    return [row["id"] for row in read_jsonl(path)] if path.exists() else []


@pytest.fixture(scope="module")
def unsharded(prompts, tmp_path_factory) -> dict[str, list[dict]]:
    """The reference: one plain `openkd generate` over all prompts."""
    out = tmp_path_factory.mktemp("unsharded")
    config = mock_config(out / "c.yaml", prompts, out / "teacher.jsonl", eval_fraction=0.2)
    proc = subprocess.run(
        [sys.executable, "-m", "openkd", "generate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return {
        "train": read_jsonl(out / "teacher.jsonl"),
        "eval": read_jsonl(out / "teacher.eval.jsonl"),
    }


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


@pytest.mark.slow
def test_array_tasks_then_merge_equal_one_unsharded_run(prompts, unsharded, tmp_path):
    stubs = make_stubs(tmp_path / "bin", ["scontrol"])
    output = tmp_path / "out" / "teacher.jsonl"
    config = mock_config(tmp_path / "c.yaml", prompts, output, eval_fraction=0.2)
    for task in range(3):
        env = {
            "CONFIG": str(config),
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_COUNT": "3",
        }
        proc = run_script(SLURM / "generate_array.sbatch", env, stubs)
        assert proc.returncode == 0, proc.stderr
        shard = output.with_name(f"teacher.shard-{task}-of-3.jsonl")
        assert 0 < len(ids(shard)) < len(unsharded["train"])

    proc = run_script(SLURM / "merge.sbatch", {"CONFIG": str(config), "NUM_SHARDS": "3"}, stubs)
    assert proc.returncode == 0, proc.stderr
    merged = read_jsonl(output)
    assert len(by_id(merged)) == len(merged), "duplicate ids in the merged output"
    assert by_id(merged) == by_id(unsharded["train"])
    assert by_id(read_jsonl(output.with_name("teacher.eval.jsonl"))) == by_id(unsharded["eval"])
    meta = json.loads(output.with_name("teacher.meta.json").read_text())
    assert meta["counts"]["train"]["rows"] == len(merged)
    assert not (log_dir(stubs) / "scontrol").exists(), "nothing was requeued"


@pytest.mark.slow
def test_array_task_requeues_itself_at_the_time_limit_warning_and_resumes(
    prompts, unsharded, tmp_path
):
    import psutil

    stubs = make_stubs(tmp_path / "bin", ["scontrol"])
    output = tmp_path / "out" / "teacher.jsonl"
    shard = output.with_name("teacher.shard-0-of-1.jsonl")
    config = mock_config(tmp_path / "c.yaml", prompts, output, concurrency=4, mock_latency=0.02)
    env = {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin:/bin",
        "STUB_LOG": str(log_dir(stubs)),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "CONFIG": str(config),
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_TASK_COUNT": "1",
    }
    shell = subprocess.Popen(
        ["bash", str(SLURM / "generate_array.sbatch")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ids(shard) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = psutil.Process(shell.pid).children(recursive=True)
        assert ids(shard), "the task wrote nothing"
        shell.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends
        _, stderr = shell.communicate(timeout=120)
    finally:
        if shell.poll() is None:
            shell.kill()
    assert shell.returncode == 0, stderr
    assert "requeueing job 4242" in stderr
    assert (log_dir(stubs) / "scontrol").read_text().splitlines() == ["requeue 4242"]
    done = ids(shard)
    assert 0 < len(done) < 120, "the task should have stopped early"
    assert len(set(done)) == len(done)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"openkd outlived the requeued task: {alive}"

    # The requeued run resumes: only the remaining prompts are labelled.
    proc = run_script(SLURM / "generate_array.sbatch", env, stubs)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(done):,} rows already in teacher.shard-0-of-1.jsonl are skipped" in proc.stderr
    final = ids(shard)
    assert final[: len(done)] == done
    expected = {row["id"] for row in unsharded["train"] + unsharded["eval"]}
    assert len(final) == len(set(final)) and set(final) == expected


def test_array_task_outside_the_shard_range_is_refused(tmp_path):
    stubs = make_stubs(tmp_path / "bin", ["scontrol"])
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "6", "NUM_SHARDS": "4"}
    proc = run_script(SLURM / "generate_array.sbatch", env, stubs)
    assert proc.returncode == 2
    assert "array task 5 is outside 0..3" in proc.stderr and "--array=0-3" in proc.stderr


def test_merge_names_the_missing_shards_and_how_to_rerun_them(tmp_path):
    stubs = make_stubs(tmp_path / "bin", ["scontrol"])
    output = tmp_path / "teacher.jsonl"
    for task in (0, 2):
        output.with_name(f"teacher.shard-{task}-of-4.jsonl").write_text("")
    env = {"OUTPUT": str(output), "NUM_SHARDS": "4"}
    proc = run_script(SLURM / "merge.sbatch", env, stubs)
    assert proc.returncode == 1
    assert "task(s) 1,3 of 4" in proc.stderr
    assert "sbatch --array=1,3 --export=ALL,NUM_SHARDS=4" in proc.stderr
    assert not output.exists()


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """submit_generate.sh works from the repository root (and creates logs/ there)."""
    copy = tmp_path / "repo"
    shutil.copytree(SLURM, copy / "configs" / "slurm")
    return copy


def test_submit_generate_chains_the_merge_after_every_array_task(repo_copy, tmp_path):
    stubs = make_stubs(tmp_path / "bin", ["sbatch"])
    script = repo_copy / "configs" / "slurm" / "submit_generate.sh"
    proc = subprocess.run(
        ["bash", str(script), "6", "--gpus-per-task=2"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PATH": f"{stubs}{os.pathsep}/usr/bin:/bin",
            "STUB_LOG": str(log_dir(stubs)),
        },
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    array, merge = (log_dir(stubs) / "sbatch").read_text().splitlines()
    assert array == (
        "--parsable --array=0-5 --export=ALL,NUM_SHARDS=6 --gpus-per-task=2 "
        "configs/slurm/generate_array.sbatch"
    )
    assert merge == (
        "--parsable --dependency=afterok:1001 --export=ALL,NUM_SHARDS=6 configs/slurm/merge.sbatch"
    )
    assert "array 1001 (6 shards) and merge 1002" in proc.stdout
    assert (repo_copy / "logs").is_dir(), "Slurm cannot write logs/%x-%A_%a.out without it"

    bad = subprocess.run(["bash", str(script), "six"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_submit_generate_gives_the_merge_job_the_account_qos_and_partition(repo_copy, tmp_path):
    """The merge job must be accepted by the same account, QoS and partition as the array;
    a task's size (GPUs, memory, time) is the array's alone."""
    stubs = make_stubs(tmp_path / "bin", ["sbatch"])
    script = repo_copy / "configs" / "slurm" / "submit_generate.sh"
    flags = [
        "--account=proj7",
        "--qos", "high",
        "-p", "gpu",
        "--gpus-per-task=2",
        "--mem", "128G",
        "-t", "08:00:00",
        "--reservation=kd",
    ]  # fmt: skip
    proc = subprocess.run(
        ["bash", str(script), "4", *flags],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PATH": f"{stubs}{os.pathsep}/usr/bin:/bin",
            "STUB_LOG": str(log_dir(stubs)),
        },
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    array, merge = (log_dir(stubs) / "sbatch").read_text().splitlines()
    assert array == (
        "--parsable --array=0-3 --export=ALL,NUM_SHARDS=4 " + " ".join(flags)
        + " configs/slurm/generate_array.sbatch"
    )  # fmt: skip
    assert merge == (
        "--parsable --dependency=afterok:1001 --export=ALL,NUM_SHARDS=4 "
        "--account=proj7 --qos high -p gpu --reservation=kd configs/slurm/merge.sbatch"
    )


def test_train_job_starts_one_accelerate_launcher_per_node(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    stubs = make_stubs(tmp_path / "bin", ["scontrol", "srun", "accelerate"])
    env = {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[001-002]"}
    proc = run_script(SLURM / "train_multinode.sbatch", env, stubs)
    assert proc.returncode == 0, proc.stderr
    parser = launch_command_parser()
    ranks = []
    for node in (0, 1):
        words = (log_dir(stubs) / f"accelerate.{node}").read_text().split("\0")[:-1]
        assert words[0] == "launch"
        args = parser.parse_args(words[1:])
        ranks.append(args.machine_rank)
        assert (args.num_machines, args.num_processes) == (2, 16)
        assert (args.main_process_ip, args.main_process_port) == ("gpu001", 20000 + 4242)
        assert Path(args.config_file).name == "multinode_zero3.yaml"
        assert args.module and args.training_script == "openkd"
        assert args.training_script_args == [
            "train",
            "--config",
            "configs/slurm/distill.yaml",
            "--output-dir",
            "outputs/numina-qwen7b/student",
        ]
    assert ranks == [0, 1]


def node_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "SERVER": "vllm",
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "CONFIG": str(SLURM / "distill.yaml"),
        **extra,
    }


OPENKD_DRY = f"""#!/bin/bash
echo "$*" >> "$STUB_LOG/openkd"
if [[ " $* " == *" --dry-run "* ]]; then exec {sys.executable} -m openkd "$@"; fi
exec {sys.executable} -m openkd "$@" --dry-run
"""


def server_args(stubs: Path):
    """What the node script passed to `vllm serve`, parsed by vLLM's own parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    words = (log_dir(stubs) / "vllm-args").read_text().split("\0")[:-1]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(words)


def node_config(tmp_path: Path, **generate) -> str:
    """distill.yaml's generate section with `generate` on top."""
    section = yaml.safe_load((SLURM / "distill.yaml").read_text())["generate"]
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"generate": {**section, **generate}}))
    return str(path)


def test_node_script_runs_its_own_vllm_server_and_stops_it(tmp_path):
    import psutil

    stubs = make_stubs(tmp_path / "bin", ["python", "curl", "openkd"], {"openkd": OPENKD_DRY})
    (tmp_path / "logs").mkdir()
    proc = run_script(SLURM / "generate_node.sh", node_env(tmp_path, TP="2"), stubs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    from openkd.generate.vllm.server import SERVE_MODULE

    # `vllm serve`, started the way openkd's --serve starts it.
    assert (log_dir(stubs) / "vllm-module").read_text().strip() == SERVE_MODULE
    args = server_args(stubs)
    assert args.model_tag == "Qwen/Qwen2.5-7B-Instruct" == args.served_model_name[0]
    assert (args.tensor_parallel_size, args.data_parallel_size) == (2, 4)
    assert (args.dtype, args.max_model_len) == ("bfloat16", 8192)
    assert not args.trust_remote_code
    assert args.max_logprobs == 20, "vLLM's default: no --logprobs in distill.yaml"
    server = int((log_dir(stubs) / "vllm-pid").read_text())
    assert not psutil.pid_exists(server) or psutil.Process(server).status() == "zombie"

    assert "http://127.0.0.1:8000/health" in (log_dir(stubs) / "curl").read_text()
    calls = (log_dir(stubs) / "openkd").read_text().splitlines()
    labelling = calls[-1]
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert f"--base-url http://{host or socket.gethostname()}:8000/v1" in labelling
    assert "--backend openai --no-serve" in labelling and "--shard 1/2" in labelling
    # The client's exact command was validated first, before the server started.
    assert calls[0] == labelling + " --dry-run"


def test_node_server_gets_the_configs_engine_options_and_the_client_does_not(tmp_path):
    """--logprobs above 20 needs the server's --max-logprobs; vllm_args go to the server only
    (the client would refuse them without --serve)."""
    stubs = make_stubs(tmp_path / "bin", ["python", "curl", "openkd"], {"openkd": OPENKD_DRY})
    (tmp_path / "logs").mkdir()
    config = node_config(tmp_path, logprobs=32, vllm_args={"enable_prefix_caching": True})
    env = node_env(tmp_path, CONFIG=config, TP="8")
    proc = run_script(SLURM / "generate_node.sh", env, stubs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = server_args(stubs)
    assert args.max_logprobs == 32
    assert args.enable_prefix_caching is True
    assert (args.tensor_parallel_size, args.data_parallel_size) == (8, 1)
    labelling = (log_dir(stubs) / "openkd").read_text().splitlines()[-1]
    assert "--vllm-args {}" in labelling


def test_node_script_refuses_a_bad_client_config_before_starting_the_server(tmp_path):
    stubs = make_stubs(tmp_path / "bin", ["python", "curl", "openkd"], {"openkd": OPENKD_DRY})
    (tmp_path / "logs").mkdir()
    config = node_config(tmp_path, num_samples=4)  # greedy decoding: the same answer 4 times
    proc = run_script(
        SLURM / "generate_node.sh", node_env(tmp_path, CONFIG=config), stubs, cwd=tmp_path
    )
    assert proc.returncode == 2
    line = error_line(proc.stderr, last=False)  # the script may log after openkd ends
    assert "--num-samples 4" in line
    assert not (log_dir(stubs) / "vllm-args").exists(), "no server was started"
    assert not (log_dir(stubs) / "curl").exists()


def test_node_script_refuses_more_gpus_than_the_node_has(tmp_path):
    stubs = make_stubs(tmp_path / "bin", ["python", "curl", "openkd"], {"openkd": OPENKD_DRY})
    proc = run_script(
        SLURM / "generate_node.sh", node_env(tmp_path, TP="4", DP="4"), stubs, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "TP=4 x DP=4 needs 16 GPUs" in proc.stderr
    assert not (log_dir(stubs) / "vllm-args").exists()
