"""Suite (a): every numeric option of every command, given NaN, inf, -inf, a negative number,
zero and an absurd value, is refused with one line naming the flag, or means what the table
below says. Never a traceback, never a value the run cannot use.

The options come from the config classes (`numeric_fields`), so a new option is covered as soon
as it exists: it must be refused at these edges or get its meaning written into ACCEPTED.
Each case is a `--dry-run` in this process: a few milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from openkd.config import INT64_MAX, StageConfig, flag_name, numeric_fields
from openkd.decontaminate.config import DecontaminateConfig
from openkd.eval.config import EvalConfig
from openkd.generate.config import GenerateConfig
from openkd.train.config import TrainConfig
from tests.conftest import run_cli
from tests.helpers import error_line, invoke

CLASSES: dict[str, type[StageConfig]] = {
    "generate": GenerateConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "decontaminate": DecontaminateConfig,
}
# The flags each command needs to validate at all (never read: --dry-run does no work).
REQUIRED = {
    "generate": ["--teacher", "t", "--dataset", "d.jsonl", "--backend", "mock"],
    "train": ["--student", "s", "--dataset", "d.jsonl"],
    "eval": ["--student", "s", "--dataset", "d.jsonl"],
    "decontaminate": ["--dataset", "d.jsonl", "--benchmark", "b.jsonl", "--output", "o.jsonl"],
}
ON_POLICY = ["--loss", "on-policy", "--teacher", "t"]
# Options that apply only with another setting: given that setting, so the value is what is tested.
NEEDS = {
    ("train", "kd_alpha"): ["--loss", "mix"],
    ("train", "kd_temperature"): ["--loss", "soft"],
    ("train", "cross_tokenizer_min_coverage"): ["--loss", "mix"],
    **{
        ("train", name): ON_POLICY
        for name in (
            "kd_beta",
            "kd_lambda",
            "max_completion_length",
            "num_samples",
            "sampling_temperature",
            "sampling_top_p",
        )
    },
}

NON_FINITE = ("nan", "inf", "-inf")
CASES = (*NON_FINITE, "negative", "zero", "absurd")


def case_value(case: str, kind: type) -> str:
    return {
        "negative": "-1",
        "zero": "0",
        "absurd": "1e30" if kind is float else str(10**12),
    }.get(case, case)


ENGINE_ACCEPTED = {
    ("tensor_parallel_size", "absurd"): "vLLM: checked against this machine's GPUs (one line) "
    "before the engine starts",
    ("max_model_len", "absurd"): "vLLM refuses a context beyond the model's when the engine "
    "starts; a --max-new-tokens above --max-model-len is refused before that",
    ("max_num_seqs", "absurd"): "vLLM refuses more sequences than tokens per step "
    "(max_num_batched_tokens) when the engine starts",
    ("max_retries", "zero"): "no retries: a request that fails is recorded as failed at once",
}
# (command, option, case) -> what the value means. Anything not listed must be refused.
ACCEPTED: dict[tuple[str, str, str], str] = {
    **{("generate", o, c): m for (o, c), m in ENGINE_ACCEPTED.items()},
    **{("eval", o, c): m for (o, c), m in ENGINE_ACCEPTED.items()},
    ("generate", "data_parallel_size", "absurd"): ENGINE_ACCEPTED[
        ("tensor_parallel_size", "absurd")
    ],
    ("generate", "max_samples", "absurd"): "more than the dataset has: every prompt",
    ("generate", "shuffle_seed", "zero"): "a seed (any integer >= 0)",
    ("generate", "shuffle_seed", "absurd"): "a seed (any integer >= 0)",
    ("generate", "eval_fraction", "zero"): "no held-out prompts (the default)",
    ("generate", "temperature", "zero"): "greedy decoding (the default)",
    ("generate", "temperature", "absurd"): "near-uniform sampling; generate warns that answers "
    "are sampled, not greedy",
    ("generate", "seed", "negative"): "any 64-bit integer: sample i of a prompt uses seed + i",
    ("generate", "seed", "zero"): "the default seed",
    ("generate", "seed", "absurd"): "any 64-bit integer: sample i of a prompt uses seed + i",
    ("generate", "serve_port", "zero"): "--serve picks a free port (the default)",
    ("generate", "mock_latency", "zero"): "the mock answers at once (the default)",
    ("train", "eval_fraction", "zero"): "no held-out rows (the default)",
    ("train", "max_samples", "absurd"): "more than the dataset has: every row",
    ("train", "learning_rate", "absurd"): "diverges: training stops with one line at the "
    "first non-finite loss or gradient norm",
    ("train", "warmup_ratio", "zero"): "no warmup",
    ("train", "weight_decay", "zero"): "no weight decay (the default)",
    ("train", "weight_decay", "absurd"): "diverges like a huge learning rate: stopped at the "
    "first non-finite loss",
    ("train", "max_steps", "absurd"): "trains until stopped; a rerun resumes",
    ("train", "batch_size", "absurd"): "more than the dataset has: every row in one batch",
    ("train", "gradient_accumulation_steps", "absurd"): "more micro-batches than an epoch has: "
    "one optimizer step per epoch",
    ("train", "seed", "zero"): "a seed (0 to 2^32-1, numpy's range)",
    ("train", "kd_alpha", "zero"): "--loss mix with the soft term alone",
    ("train", "cross_tokenizer_min_coverage", "zero"): "train across tokenizers whatever the "
    "coverage (the override)",
    ("train", "kd_temperature", "absurd"): "flattens both distributions; the T^2 scale "
    "overflows and training stops at the first non-finite loss",
    ("train", "kd_beta", "zero"): "forward KL(teacher || student)",
    ("train", "kd_lambda", "zero"): "no step on the student's own samples: every step scores "
    "the dataset's answers",
    ("train", "sampling_temperature", "absurd"): "the student samples near-uniform answers",
    ("train", "lora_alpha", "absurd"): "LoRA scale alpha/r: diverges, stopped at the first "
    "non-finite loss",
    ("train", "lora_dropout", "zero"): "no dropout",
    ("train", "save_steps", "absurd"): "no checkpoint before the final save",
    ("train", "save_total_limit", "absurd"): "keeps every checkpoint",
    ("train", "logging_steps", "absurd"): "no loss line before the end",
    ("train", "eval_steps", "absurd"): "no evaluation before the end",
    ("eval", "max_samples", "absurd"): "more than the dataset has: every prompt",
    ("eval", "nll_batch_size", "absurd"): "more than the dataset has: every row in one pass",
    ("eval", "temperature", "zero"): "greedy benchmark answers (the default)",
    ("eval", "temperature", "absurd"): "near-uniform sampling of benchmark answers",
    (
        "eval",
        "on_policy_temperature",
        "absurd",
    ): "near-uniform student samples for the on-policy KL",
    ("eval", "seed", "negative"): "any 64-bit integer: sample i of a prompt uses seed + i",
    ("eval", "seed", "zero"): "the default seed",
    ("eval", "seed", "absurd"): "any 64-bit integer: sample i of a prompt uses seed + i",
    ("decontaminate", "ngram_size", "absurd"): "longer than any text, so nothing can match; a "
    "warning counts the benchmark rows too short to match",
}

OPTIONS = [(cmd, name) for cmd, cls in CLASSES.items() for name in numeric_fields(cls)]


def dry_run(command: str, name: str, value: str):
    return invoke(
        command,
        *REQUIRED[command],
        *NEEDS.get((command, name), []),
        flag_name(name),
        value,
        "--dry-run",
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing should be written; if it were, not in the checkout


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command,name", OPTIONS, ids=[f"{c}{flag_name(n)}" for c, n in OPTIONS])
def test_numeric_option_edge(command, name, case):
    kind = numeric_fields(CLASSES[command])[name]
    value = case_value(case, kind)
    proc = dry_run(command, name, value)
    if (command, name, case) in ACCEPTED:
        assert proc.returncode == 0, proc.stderr
        assert yaml.safe_load(proc.stdout)[command][name] == kind(value)
        return
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:])
    line = error_line(proc.stderr)
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr
    assert flag_name(name) in line, line
    if case in NON_FINITE:
        assert f"{flag_name(name)}: {value} is not a finite number" in line


@pytest.mark.parametrize("command,name", OPTIONS, ids=[f"{c}{flag_name(n)}" for c, n in OPTIONS])
def test_an_ordinary_value_is_accepted(command, name):
    """The edge cases above are refused for their value, not because the option needs another
    flag the suite forgot to give (NEEDS)."""
    info = CLASSES[command].model_fields[name]
    kind = numeric_fields(CLASSES[command])[name]
    default = info.get_default(call_default_factory=True)
    value = str(default if default is not None else kind(1) if kind is int else 0.5)
    proc = dry_run(command, name, value)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)[command][name] == kind(value)


def test_the_tables_name_real_options_and_never_accept_non_finite_values():
    for command, name, case in ACCEPTED:
        assert name in numeric_fields(CLASSES[command]), (command, name)
        assert case in CASES and case not in NON_FINITE
    for command, name in NEEDS:
        assert name in numeric_fields(CLASSES[command]), (command, name)
    # Optional and plain fields of both kinds are enumerated.
    assert numeric_fields(GenerateConfig)["concurrency"] is int  # int | None
    assert numeric_fields(TrainConfig)["kd_alpha"] is float  # float | None
    assert numeric_fields(GenerateConfig)["temperature"] is float
    assert "stop" not in numeric_fields(GenerateConfig) and "lora" not in numeric_fields(
        TrainConfig
    )


def test_yaml_nan_and_inf_are_refused_like_flags(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "generate:\n  teacher: t\n  dataset: d.jsonl\n  backend: mock\n"
        "  temperature: .inf\n  top_p: .nan\n  max_new_tokens: .nan\n  mock_latency: 'nan'\n"
    )
    proc = invoke("generate", "--config", config, "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    for problem in (
        "--temperature: inf is not a finite number",
        "--top-p: nan is not a finite number",
        "--max-new-tokens: nan is not a finite number",
        "--mock-latency: nan is not a finite number",
    ):
        assert problem in line


def test_integers_beyond_64_bits_are_refused():
    proc = invoke("generate", *REQUIRED["generate"], "--seed", str(10**30), "--dry-run")
    assert proc.returncode == 2
    assert f"--seed: {10**30} does not fit a 64-bit integer" in error_line(proc.stderr)
    # Each sample's seed is seed + sample: the last one must fit too.
    proc = invoke(
        "generate", *REQUIRED["generate"], "--seed", str(INT64_MAX), "--num-samples", "2",
        "--temperature", "0.6", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "sample 1 of a prompt gets seed + 1" in error_line(proc.stderr)


# make-tiny has no --dry-run: only values it must refuse are cheap to try. These (option, case)
# build a model and are valid, so they are not run.
MAKE_TINY_ACCEPTED = {
    ("seed", "zero"): "the default seed",
    ("seed", "absurd"): "any seed from 0 to 2^63-1",
    ("weights_seed", "zero"): "a seed for the weights alone",
    ("weights_seed", "absurd"): "any seed from 0 to 2^63-1",
}


def _make_tiny_options() -> list[tuple[str, type]]:
    """make-tiny's numeric options, from its function's signature (it has no config class)."""
    import typing

    from openkd.cli import make_tiny

    out = []
    for name, hint in typing.get_type_hints(make_tiny).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(args) == 1 and args[0] in (int, float):
            out.append((name, args[0]))
    return out


MAKE_TINY = [
    (name, kind, case)
    for name, kind in _make_tiny_options()
    for case in CASES
    if (name, case) not in MAKE_TINY_ACCEPTED
]


@pytest.mark.parametrize(
    "name,kind,case", MAKE_TINY, ids=[f"{flag_name(n)}-{c}" for n, _, c in MAKE_TINY]
)
def test_make_tiny_refuses_numeric_edges(tmp_path, name, kind, case):
    out = tmp_path / "tiny"
    value = case_value(case, kind)
    proc = invoke("make-tiny", out, flag_name(name), value)
    assert proc.returncode == 2, proc.stdout[-500:]
    # A value typer cannot parse as an integer is its usage error ("Invalid value for
    # '--layers'"), printed as one line like make-tiny's own errors.
    line = error_line(proc.stderr, only=True)
    assert flag_name(name) in line, proc.stderr
    assert not out.exists()


def test_make_tiny_table_names_real_options():
    names = {name for name, _ in _make_tiny_options()}
    assert {"hidden_size", "init_std", "num_prompts"} <= names
    assert {name for name, _ in MAKE_TINY_ACCEPTED} <= names


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--teacher", "t", "--dataset", "d.jsonl", "--temperature", "inf"],
        ["train", "--student", "s", "--dataset", "d.jsonl", "--learning-rate", "nan"],
        ["eval", "--student", "s", "--dataset", "d.jsonl", "--max-new-tokens", "1e30"],
        ["decontaminate", *REQUIRED["decontaminate"], "--ngram-size", "-inf"],
    ],
    ids=lambda a: f"{a[0]}-{a[-2]}",
)
def test_real_process_exit_code_and_one_line(tmp_path: Path, args):
    proc = run_cli(*args, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {args[-2]}: "), proc.stderr
    assert proc.stdout == ""
