"""Settings that were accepted and ignored, or refused with a misleading message (issue 15,
"Misleading, smaller"): each now gets one line naming the real problem, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from openkd.config import resolve, save_resolved
from openkd.generate.config import GenerateConfig
from openkd.pipeline import RECIPE_ENV, STAGE_ENV, in_recipe_terms
from tests.conftest import run_cli, write_jsonl
from tests.helpers import error_line, invoke

GENERATE = ["generate", "--teacher", "t", "--backend", "mock"]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"hello world {i}", "q": f"q{i}"} for i in range(6)]
    )


def _folder(rows_file: Path) -> Path:
    folder = rows_file.parent / "data"
    folder.mkdir()
    (folder / rows_file.name).write_bytes(rows_file.read_bytes())
    return folder


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# -- config files -------------------------------------------------------------------------------


def test_generate_keys_under_train_name_the_section_they_belong_in(tmp_path):
    cfg = _yaml(
        tmp_path, "train:\n  student: s\n  dataset: p.jsonl\n  backend: mock\n  top_p: 0.9\n"
    )
    # `openkd generate` said "--teacher is required": its own section is missing.
    proc = invoke("generate", "--teacher", "t", "--dataset", "d", "--config", cfg, "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "keys 'backend', 'top_p' in section 'train' belong in 'generate:'" in line
    proc = invoke("train", "--config", cfg, "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "key 'backend' in section 'train' belongs in 'generate:' or 'eval:'" in line


def test_a_removed_key_of_another_section_is_not_called_misplaced(tmp_path):
    # batch_size is a train key, and a removed generate key: only generate's own run names it.
    cfg = _yaml(
        tmp_path, "generate:\n  teacher: t\n  dataset: d\n  batch_size: 8\ntrain:\n  student: s\n"
        "  dataset: d\n",
    )  # fmt: skip
    assert invoke("train", "--config", cfg, "--dry-run").returncode == 0
    assert "no longer used" in error_line(invoke("generate", "--config", cfg).stderr)


def test_a_file_without_the_commands_section_says_so(tmp_path):
    cfg = _yaml(tmp_path, "generate:\n  teacher: m\n  dataset: p.jsonl\n")
    proc = invoke("train", "--config", cfg, "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "--student is required" in line
    assert f"{cfg} has no `train:` section (its sections: generate)" in line


def test_config_and_recipe_directories_are_called_directories(tmp_path):
    proc = invoke("generate", "--config", tmp_path, "--dry-run")
    assert proc.returncode == 2
    assert error_line(proc.stderr) == f"error: --config {tmp_path} is a directory; pass a YAML file"
    proc = invoke("run", tmp_path)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert f"recipe {tmp_path} is a directory" in line and "--config" not in line
    assert "--config" not in error_line(invoke("run", tmp_path / "none.yaml").stderr)


# -- flags accepted and ignored -----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--split", "test"], "is a local dataset with one split, so --split 'test' cannot apply"),
        (["--subset", "main"], "is local, and --subset 'main' names a configuration of a Hub"),
    ],
)
def test_split_and_subset_of_a_local_file_are_refused(tmp_path, prompts, flags, expected):
    out = tmp_path / "out.jsonl"
    proc = invoke(*GENERATE, "--dataset", prompts, "--output", out, *flags)
    assert proc.returncode == 2
    assert expected in error_line(proc.stderr)
    assert not out.exists()
    # A folder of data files is one split too; `--split train` names that split and is fine.
    folder = _folder(prompts)
    proc = invoke(*GENERATE, "--dataset", folder, "--output", tmp_path / "o2.jsonl", *flags)
    assert proc.returncode == 2
    assert expected in error_line(proc.stderr)
    proc = invoke(*GENERATE, "--dataset", prompts, "--output", out, "--split", "train")
    assert proc.returncode == 0, proc.stderr


def test_prompt_template_and_prompt_column_together_are_refused(tmp_path):
    for command in (
        [*GENERATE, "--dataset", "d.jsonl"],
        ["decontaminate", "--dataset", "d.jsonl", "--benchmark", "b.jsonl", "--output", "o.jsonl"],
    ):
        proc = invoke(
            *command, "--prompt-template", "{{ q }}", "--prompt-column", "nope", "--dry-run"
        )
        assert proc.returncode == 2
        assert "--prompt-column would be ignored" in error_line(proc.stderr)


def test_a_prompt_template_that_reads_no_column_is_refused(tmp_path, prompts):
    # It gave every row the same prompt: 6 prompts became 1 labelled row, with exit 0.
    out = tmp_path / "out.jsonl"
    proc = invoke(*GENERATE, "--dataset", prompts, "--output", out, "--prompt-template", "Solve")
    assert proc.returncode != 0
    assert "reads no column, so every row would get the same prompt" in error_line(proc.stderr)
    assert not out.exists()


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_empty_stop_string_is_refused(command):
    args = GENERATE if command == "generate" else ["eval", "--student", "s"]
    proc = invoke(*args, "--dataset", "d", "--stop", "\n\n", "--stop", "", "--dry-run")
    assert proc.returncode == 2
    assert "--stop '' is empty" in error_line(proc.stderr)


def test_logprobs_dtype_needs_logprobs_but_a_saved_config_is_not_a_choice(tmp_path):
    proc = invoke(*GENERATE, "--dataset", "d", "--logprobs-dtype", "float32", "--dry-run")
    assert proc.returncode == 2
    assert "--logprobs-dtype stores the log-probabilities of --logprobs K" in error_line(
        proc.stderr
    )
    assert invoke(*GENERATE, "--dataset", "d", "--logprobs", "5", "--logprobs-dtype", "float32",
                  "--dry-run").returncode == 0  # fmt: skip
    # The resolved config saved beside an output (and handed to each stage by `openkd run`)
    # writes every default out, logprobs_dtype included: that is not the user's choice.
    saved = tmp_path / "resolved.yaml"
    save_resolved(resolve(GenerateConfig, None, {"teacher": "t", "dataset": "d"}), saved)
    assert yaml.safe_load(saved.read_text())["generate"]["logprobs_dtype"] == "float16"
    assert invoke("generate", "--config", saved, "--dry-run").returncode == 0


# -- decontaminate's benchmark spec -------------------------------------------------------------


def test_a_benchmark_spec_has_at_most_four_parts(tmp_path):
    proc = invoke(
        "decontaminate", "--dataset", "d.jsonl", "--output", "o.jsonl",
        "--benchmark", "org/bench:problem:test:main:extra", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "'org/bench:problem:test:main:extra' has 5 ':'-separated parts" in line
    assert "SOURCE[:COLUMNS[:SPLIT[:SUBSET]]]" in line  # printed as is, not as rich markup
    proc = invoke(
        "decontaminate", "--dataset", "d.jsonl", "--output", "o.jsonl",
        "--benchmark", "org/bench:problem:test:main", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bench = yaml.safe_load(proc.stdout)["decontaminate"]["benchmark"][0]
    assert (bench["source"], bench["split"], bench["subset"]) == ("org/bench", "test", "main")


@pytest.mark.parametrize(
    "spec,expected",
    [
        (":problem:test", "its SPLIT 'test' cannot apply"),
        (":problem::main", "its SUBSET 'main' names a configuration of a Hub dataset"),
    ],
)
def test_a_local_benchmarks_split_and_subset_are_refused(tmp_path, prompts, spec, expected):
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"problem": "hello world 1"}])
    out = tmp_path / "clean.jsonl"
    proc = invoke(
        "decontaminate", "--dataset", prompts, "--output", out, "--benchmark", f"{bench}{spec}"
    )
    assert proc.returncode == 2
    assert expected in error_line(proc.stderr)
    assert not out.exists()


# -- errors in terms the user can act on --------------------------------------------------------


def test_an_error_quoting_markup_or_emoji_codes_prints_as_is(tmp_path):
    proc = invoke(*GENERATE, "--dataset", "x[/b]:b:.jsonl", "--output", tmp_path / "o.jsonl")
    assert proc.returncode != 0
    assert "--dataset x[/b]:b:.jsonl" in error_line(proc.stderr)


def test_a_stage_of_a_recipe_names_recipe_keys_not_flags():
    env = {RECIPE_ENV: "r.yaml", STAGE_ENV: "generate"}
    message = (
        "o.jsonl holds rows labelled with --teacher 'm' (this run: 'm2'); pass another --output "
        "for these settings, or --overwrite to relabel everything into o.jsonl"
    )
    assert in_recipe_terms(message, env) == (
        "o.jsonl holds rows labelled with generate.teacher 'm' (this run: 'm2'); set another "
        "generate.output for these settings, or delete generate.output and its side files to "
        "relabel everything into o.jsonl"
    )
    env[STAGE_ENV] = "train"
    assert in_recipe_terms("pass --overwrite to start this output dir afresh", env) == (
        "delete train.output_dir to start this output dir afresh"
    )
    # Flags that are not the stage's own (a vLLM server's) stay; outside a recipe, all do.
    assert in_recipe_terms("needs --max-logprobs K", env) == "needs --max-logprobs K"
    assert in_recipe_terms("pass --overwrite", {}) == "pass --overwrite"


@pytest.mark.slow
def test_openkd_run_stage_error_names_the_recipe_keys(tmp_path, prompts):
    recipe = tmp_path / "r.yaml"
    text = (
        f"generate:\n  teacher: m\n  backend: mock\n  dataset: {prompts}\n  output: out/t.jsonl\n"
    )
    recipe.write_text(text)
    assert run_cli("run", recipe, cwd=tmp_path).returncode == 0
    recipe.write_text(text.replace("teacher: m", "teacher: m2"))
    proc = run_cli("run", recipe, cwd=tmp_path)
    assert proc.returncode != 0
    # The stage's own one-line error, then the recipe's line naming the stage.
    stage_error, recipe_error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "stage generate failed" in recipe_error and "Traceback" not in proc.stderr
    assert "generate.teacher 'm'" in stage_error and "delete generate.output" in stage_error
    assert "--overwrite" not in stage_error and "--teacher" not in stage_error


@pytest.mark.parametrize(
    "args,message",
    [
        (("generate", "--bogus", "1"), "No such option: --bogus (see `openkd generate --help`)"),
        (("generate", "--backend", "nope"), "Invalid value for '--backend'"),
        (("make-tiny", "x", "--layers", "two"), "Invalid value for '--layers'"),
        (("merge",), "Missing argument"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    proc = invoke(*args)
    assert proc.returncode == 2
    assert message in error_line(proc.stderr, only=True), proc.stderr
