"""The Slurm scripts in configs/slurm/ cannot drift from the CLIs they call.

Every `openkd generate|train|merge`, `accelerate launch` and vLLM server command line in the
scripts (and in the README's bash blocks) is extracted, its shell variables are expanded by
bash itself with plausible Slurm values, and the result is checked against the real parsers:
`openkd ... --dry-run` (openkd's own validation, exit 0, and every flag value must come back in
the resolved config), click for `openkd merge`, accelerate's and vLLM's argument parsers.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from openkd.generate.vllm.server import SERVE_MODULE

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "configs" / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch")])
README = SLURM / "README.md"
VENV_BIN = Path(sys.executable).parent

# Values a Slurm job would see: an array task 0 of 4, node 0 of a 2-node job with 8 GPUs.
PLAUSIBLE_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_ARRAY_JOB_ID": "4240",
    "SLURM_ARRAY_TASK_ID": "0",
    "SLURM_ARRAY_TASK_COUNT": "4",
    "SLURM_ARRAY_TASK_MIN": "0",
    "SLURM_ARRAY_TASK_MAX": "3",
    "SLURM_NODEID": "0",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "0",
    "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_GPUS_PER_TASK": "1",
    "SLURM_SUBMIT_DIR": str(ROOT),
    "NUM_SHARDS": "4",
    "OUTPUT": "outputs/numina-qwen7b/teacher.jsonl",
    # generate_node.sh reads these from `openkd generate --dry-run` at run time.
    "TEACHER": "Qwen/Qwen2.5-7B-Instruct",
    "MODEL": "Qwen/Qwen2.5-7B-Instruct",
    "SERVE_MODULE": SERVE_MODULE,  # --serve's way to run `vllm serve`; the node script's too
    "MASTER_ADDR": "gpu001",
    "OUTPUT_DIR": "outputs/numina-qwen7b/student",
    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
}
# Bash arrays the scripts build in loops, and commands that only exist on a cluster.
BASH_PRELUDE = """
shards=(outputs/numina-qwen7b/teacher.shard-0-of-4.jsonl outputs/numina-qwen7b/teacher.shard-1-of-4.jsonl)
hostname() { echo gpu001; }
scontrol() { if [[ "$1 $2" == "show hostnames" ]]; then echo gpu001; echo gpu002; fi; }
nvidia-smi() { for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100"; done; }
sbatch() { echo 4240; }
"""

COMMAND_START = re.compile(
    r"(?P<accelerate>\baccelerate\s+launch\b)"
    r"|(?P<vllm>\bpython3?\s+-m\s+vllm\.entrypoints\.openai\.api_server\b"
    r"|\bpython3?\s+-m\s+\S+\s+serve\b|\bvllm\s+serve\b)"
    r"|(?P<openkd>(?<![\w/.-])openkd\s+(?:generate|train|merge)\b)"
)
ASSIGNMENT = re.compile(r"^(?:export\s+)?[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    source: str
    kind: str  # openkd | accelerate | vllm
    text: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, as the shell reads them."""
    return re.sub(r"\\\n", " ", text).splitlines()


def command_end(line: str, start: int, *, word: bool = False) -> int:
    """Index where the simple command at `start` ends: an unquoted |, &, ;, <, >, ), #
    (with `word`, where the shell word at `start` ends: also at unquoted whitespace)."""
    closers: list[str] = []
    i = start
    while i < len(line):
        c = line[i]
        top = closers[-1] if closers else None
        if top == "'":
            if c == "'":
                closers.pop()
        elif c == "\\":
            i += 2
            continue
        elif line.startswith(("$(", "${"), i) and top != "'":
            closers.append(")" if line[i + 1] == "(" else "}")
            i += 2
            continue
        elif top == '"':
            if c == '"':
                closers.pop()
        elif top in (")", "}"):
            if c == top:
                closers.pop()
            elif c in "'\"":
                closers.append(c)
            elif c == "(":
                closers.append(")")
        elif c in "'\"":
            closers.append(c)
        elif word and c.isspace():
            return i
        elif c in "|&;<>)":
            if c == ">" and i > start and line[i - 1].isdigit() and line[i - 2].isspace():
                return i - 1
            return i
        elif c == "#" and line[i - 1].isspace():
            return i
        i += 1
    return i


def is_plain_assignment(line: str) -> bool:
    """`NAME=word` (or `export NAME=word`) at the top level, and nothing else on the line."""
    match = ASSIGNMENT.match(line)
    if not match:
        return False
    rest = line[command_end(line, match.end(), word=True) :].strip()
    return rest == "" or rest.startswith("#")


def expand(source: str, script_text: str, command: str) -> tuple[str, ...]:
    """The words bash makes of `command`, after the script's top-level assignments."""
    assignments = [line for line in logical_lines(script_text) if is_plain_assignment(line)]
    print_words = "printf '%s\\0' " + command
    program = "\n".join(
        [
            BASH_PRELUDE,
            *(f"eval {shlex.quote(a)} 2>/dev/null || true" for a in assignments),
            "set -u",
            f"eval {shlex.quote(print_words)}",
        ]
    )
    proc = subprocess.run(
        ["bash", "-c", program],
        capture_output=True,
        text=True,
        env={**os.environ, **PLAUSIBLE_ENV},
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, f"{source}: bash could not expand `{command}`: {proc.stderr}"
    return tuple(proc.stdout.split("\0")[:-1])


def extract(source: str, text: str) -> list[Command]:
    commands = []
    for line in logical_lines(text):
        if line.lstrip().startswith("#"):
            continue
        pos = 0
        while match := COMMAND_START.search(line, pos):
            end = command_end(line, match.start())
            snippet = line[match.start() : end].strip()
            commands.append(
                Command(source, match.lastgroup or "", snippet, expand(source, text, snippet))
            )
            pos = end + 1
    return commands


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def all_commands() -> list[Command]:
    commands = []
    for script in SCRIPTS:
        commands += extract(script.name, script.read_text())
    for n, block in enumerate(readme_blocks()):
        commands += extract(f"README.md block {n + 1}", block)
    return commands


COMMANDS = all_commands()


def openkd_runs() -> list[Command]:
    """Every `openkd generate|train` call, including those inside `accelerate launch`."""
    runs = []
    for cmd in COMMANDS:
        if cmd.kind == "openkd" and cmd.words[1] in ("generate", "train"):
            runs.append(cmd)
        elif cmd.kind == "accelerate":
            words = cmd.words
            i = words.index("-m")
            assert words[i + 1] == "openkd", f"{cmd}: accelerate should run `-m openkd`"
            runs.append(Command(cmd.source, "openkd", cmd.text, ("openkd", *words[i + 2 :])))
    return runs


def ids(commands: list[Command]) -> list[str]:
    return [f"{c.source}:{' '.join(c.words[:2])}:{n}" for n, c in enumerate(commands)]


# --- the scripts themselves ---------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_with_bash_n(script: Path):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_has_header_and_strict_mode(script: Path):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/bin/bash", f"{script.name}: start with #!/bin/bash"
    header = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for word in ("Purpose:", "Prerequisites:"):
        assert word in text, f"{script.name}: the header must say {word}"
    assert "Submit:" in text or "Run:" in text, f"{script.name}: the header must say how to run it"
    first_command = next(
        line for line in lines[1:] if line.strip() and not line.lstrip().startswith("#")
    )
    assert first_command == "set -euo pipefail", (
        f"{script.name}: the first command must be `set -euo pipefail`, got {first_command!r}"
    )


def test_requeueable_jobs_trap_the_warning_signal():
    for name in ("generate_array.sbatch", "generate_nodes.sbatch", "train_multinode.sbatch"):
        text = (SLURM / name).read_text()
        assert "#SBATCH --requeue" in text, name
        assert re.search(r"#SBATCH --signal=B:USR1@\d+", text), name
        assert "trap requeue USR1" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text, name
        # A foreground child would delay the trap until it exits: the work runs in the background.
        assert re.search(r"&\n(\w+_pid)=\$!\nwait \"\$\1\"", text), name


def test_training_checkpoints_before_the_time_limit_requeue():
    """USR1 first SIGTERMs the steps (every rank saves at the next step), waits, then requeues;
    the launcher passes SIGTERM/SIGUSR1 on and waits for the save within the signal's lead."""
    from openkd.errors import PREEMPTED

    text = (SLURM / "train_multinode.sbatch").read_text()
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", text).group(1))
    body = text[text.index("requeue() {") : text.index("trap requeue USR1")]
    assert body.index('scancel --signal=TERM "$SLURM_JOB_ID"') < body.index('wait "$srun_pid"')
    assert body.index('wait "$srun_pid"') < body.index('scontrol requeue "$SLURM_JOB_ID"')
    handled = re.search(r"export PET_SIGNALS_TO_HANDLE=(\S+)", text).group(1).split(",")
    assert {"SIGTERM", "SIGUSR1"} <= set(handled)
    timeout = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    assert 0 < timeout < lead
    assert f"PREEMPTED={PREEMPTED}" in text


def _run_train_script(tmp_path: Path, srun_body: str) -> tuple[int, str]:
    """train_multinode.sbatch with stand-ins for srun/scontrol/scancel; the calls they got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    for name, body in {
        "srun": srun_body,
        "scontrol": 'if [[ "$1" == show ]]; then echo gpu001; else echo "scontrol $*" >> "$CALLS"; fi',
        "scancel": 'echo "scancel $*" >> "$CALLS"',
    }.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    env = {
        **PLAUSIBLE_ENV,
        "PATH": f"{bin_dir}{os.pathsep}{PLAUSIBLE_ENV['PATH']}",
        "OUTPUT_DIR": str(tmp_path / "out"),
        "CALLS": str(calls),
    }
    proc = subprocess.run(
        ["bash", str(SLURM / "train_multinode.sbatch")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, calls.read_text() if calls.exists() else ""


def test_training_preempted_behind_the_launcher_is_requeued(tmp_path: Path):
    # accelerate's launcher exits 143 after its workers saved and recorded the preemption
    code, calls = _run_train_script(
        tmp_path,
        'mkdir -p "$OUTPUT_DIR"\n'
        """echo '{"status": "preempted"}' > "$OUTPUT_DIR/openkd_run.json"\n"""
        "exit 143",
    )
    assert code == 0
    assert calls.splitlines() == ["scontrol requeue 4242"]


@pytest.mark.parametrize("status", [75, 1], ids=["preempted-exit-code", "failure"])
def test_training_exit_code_decides_the_requeue(tmp_path: Path, status: int):
    code, calls = _run_train_script(tmp_path, f"exit {status}")
    if status == 75:
        assert (code, calls.splitlines()) == (0, ["scontrol requeue 4242"])
    else:  # a real failure (no preemption recorded) is not requeued forever
        assert (code, calls) == (1, "")


def test_extraction_found_every_kind_of_command():
    """Guards the test itself: an extractor that finds nothing would pass vacuously."""
    by_source: dict[str, set[str]] = {}
    for cmd in COMMANDS:
        by_source.setdefault(cmd.source, set()).add(" ".join(cmd.words[:2]))
    assert "openkd generate" in by_source["generate_array.sbatch"]
    assert {"openkd generate", "python -m"} <= by_source["generate_node.sh"]
    assert "openkd merge" in by_source["merge.sbatch"]
    assert "accelerate launch" in by_source["train_multinode.sbatch"]
    readme = set().union(*(v for k, v in by_source.items() if k.startswith("README")))
    assert {"openkd generate", "openkd train", "accelerate launch", "vllm serve"} <= readme


def test_array_task_shards_by_array_index():
    (cmd,) = [c for c in COMMANDS if c.source == "generate_array.sbatch" and c.kind == "openkd"]
    words = list(cmd.words)
    assert words[words.index("--shard") + 1] == "0/4"


# --- the commands against the real CLIs ---------------------------------------------------


def _expected_values(words: tuple[str, ...], fields: dict) -> dict[str, object]:
    """--flag value pairs (and boolean switches) as config field -> expected value."""
    expected: dict[str, object] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--") or word in ("--config", "--dry-run"):
            if word == "--config":
                i += 1
            continue
        name, _, inline = word[2:].partition("=")
        field = name.replace("-", "_")
        if field.startswith("no_") and field[3:] in fields:
            expected[field[3:]] = False
            continue
        assert field in fields, f"unknown flag {word}"
        if fields[field].annotation in (bool, bool | None):
            expected[field] = True
            continue
        value = inline or words[i]
        i += 0 if inline else 1
        expected[field] = value
    return expected


@pytest.mark.parametrize("cmd", openkd_runs(), ids=ids(openkd_runs()))
def test_openkd_command_passes_dry_run(cmd: Command):
    from openkd.generate.config import GenerateConfig
    from openkd.train.config import TrainConfig

    stage = cmd.words[1]
    args = [a for a in cmd.words[2:] if a != "--dry-run"]
    proc = subprocess.run(
        [sys.executable, "-m", "openkd", stage, *args, "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stderr}"
    resolved = yaml.safe_load(proc.stdout)[stage]
    fields = (GenerateConfig if stage == "generate" else TrainConfig).model_fields
    for field, value in _expected_values(tuple(args), fields).items():
        got = resolved[field]
        assert str(got) == str(value) or str(Path(str(got))) == str(Path(str(value))), (
            f"{cmd}: --{field.replace('_', '-')} {value} resolved to {got}"
        )


MERGES = [c for c in COMMANDS if c.kind == "openkd" and c.words[1] == "merge"]


@pytest.mark.parametrize("cmd", MERGES, ids=ids(MERGES))
def test_openkd_merge_command_parses(cmd: Command):
    """`openkd merge` has no --dry-run: parse its arguments with the real click command."""
    import typer

    from openkd.cli import app

    merge = typer.main.get_command(app).commands["merge"]  # type: ignore[attr-defined]
    ctx = merge.make_context("merge", list(cmd.words[2:]))
    assert ctx.params["shards"], f"{cmd}: no shard files"
    assert str(ctx.params["output"]).endswith(".jsonl")


ACCELERATE = [c for c in COMMANDS if c.kind == "accelerate"]


@pytest.mark.parametrize("cmd", ACCELERATE, ids=ids(ACCELERATE))
def test_accelerate_launch_command_parses(cmd: Command):
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(list(cmd.words[2:]))
    assert args.module and args.training_script == "openkd"
    config = ROOT / args.config_file
    assert config.is_file(), f"{cmd}: {args.config_file} does not exist"
    settings = yaml.safe_load(config.read_text())
    assert settings["distributed_type"] == "DEEPSPEED"
    assert settings["deepspeed_config"]["zero_stage"] == 3
    assert args.num_machines == 2 and args.machine_rank == 0
    assert args.num_processes == 16, "2 nodes x 8 GPUs"
    assert args.main_process_ip == "gpu001"


VLLM = [c for c in COMMANDS if c.kind == "vllm"]


@pytest.fixture(scope="module")
def vllm_server_parser():
    """The argument parser of vLLM's OpenAI server (its module moved between versions)."""
    import importlib

    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for module in ("vllm.entrypoints.openai.cli_args", "vllm.entrypoints.launchers.cli_args"):
        try:
            make_arg_parser = importlib.import_module(module).make_arg_parser
        except (ImportError, AttributeError):
            continue
        return make_arg_parser(FlexibleArgumentParser())
    pytest.fail("vLLM's server argument parser was not found")


@pytest.mark.slow
@pytest.mark.parametrize("cmd", VLLM, ids=ids(VLLM))
def test_vllm_server_command_parses(cmd: Command, vllm_server_parser):
    # The arguments after `vllm serve`, `python -m MODULE serve` or the older
    # `python -m vllm.entrypoints.openai.api_server`.
    start = cmd.words.index("serve") + 1 if "serve" in cmd.words[:4] else 3
    args = vllm_server_parser.parse_args(list(cmd.words[start:]))
    model = args.model if args.model_tag is None else args.model_tag
    assert model, f"{cmd}: no model"
    # openkd checks that its --teacher is among the served model names.
    assert args.served_model_name == [model], f"{cmd}: serve the model under its own name"
    assert args.tensor_parallel_size >= 1 and args.data_parallel_size >= 1
