"""`openkd run RECIPE`: shipped recipes validate, outputs are wired to inputs, failures stop it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from openkd.errors import ConfigError
from openkd.pipeline import RECIPE_ENV, STAGE_ENV, in_recipe_terms, load_recipe
from tests.conftest import run_cli, write_jsonl
from tests.helpers import invoke

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert "demo_cpu.yaml" in names
    assert len(names) >= 3  # the CPU demo and at least two GPU recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_every_section(recipe: Path):
    loaded = load_recipe(recipe)
    assert list(loaded.configs) in (
        ["generate", "train", "eval"],
        ["generate", "train", "on_policy", "eval"],
    )
    gen, train, ev = (loaded.configs[k] for k in ("generate", "train", "eval"))
    final = loaded.configs.get("on_policy", train)
    if gen.num_samples > 1:  # rejection sampling: samples differ only if the teacher samples
        assert gen.verify and gen.temperature > 0
    else:
        assert gen.temperature == 0.0  # hard labels: greedy
    assert train.dataset == str(gen.output)
    assert ev.student == str(final.output_dir)  # eval scores the last stage's student
    header = recipe.read_text().split("\n\n")[0]
    for part in ("Purpose:", "Needs:", "Run:", f"openkd run configs/recipes/{recipe.name}"):
        assert part in header, f"{recipe.name}: header lacks {part!r}"


def test_gpu_recipes_use_zero3_and_the_teachers_decoding():
    gpu = [r for r in RECIPES if r.name != "demo_cpu.yaml"]
    assert gpu
    for recipe in gpu:
        loaded = load_recipe(recipe)
        train, ev = loaded.configs["train"], loaded.configs["eval"]
        assert train.deepspeed == "zero3" and train.bf16
        assert ev.backend == "vllm"
        gen = loaded.configs["generate"]
        # Eval decodes like the teacher did: explicitly, or from the generate metadata.
        assert ev.max_new_tokens in (None, gen.max_new_tokens)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = """
generate:
  teacher: mock-reverse
  backend: mock
  dataset: data/prompts.jsonl
  output: out/teacher.jsonl
  eval_fraction: 0.1
train:
  student: models/tiny
  output_dir: out/student
eval:
  backend: transformers
  output_dir: out/eval
"""


def test_outputs_are_wired_to_inputs_and_said(tmp_path):
    recipe = load_recipe(_write(tmp_path, BASE))
    assert recipe.configs["train"].dataset == "out/teacher.jsonl"
    assert recipe.configs["eval"].dataset == "out/teacher.eval.jsonl"
    assert recipe.configs["eval"].student == "out/student"
    assert len(recipe.wiring) == 3 and "out/teacher.eval.jsonl" in recipe.wiring[1]


def test_explicit_inputs_are_not_rewired(tmp_path):
    text = BASE.replace("  output_dir: out/eval", "  output_dir: out/eval\n  dataset: other.jsonl")
    text = text.replace(
        "  output_dir: out/student", "  output_dir: out/student\n  dataset: x.jsonl"
    )
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe.configs["train"].dataset == "x.jsonl"
    assert recipe.configs["eval"].dataset == "other.jsonl"


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            ("  eval_fraction: 0.1\n", ""),
            "eval has no held-out prompts: set generate.eval_fraction",
        ),
        (("  output_dir: out/eval", "  output_dir: out/eval\n  nll_batchsize: 4"), "unknown key"),
        (("  backend: transformers", "  backend: mock"), "section 'eval'"),
        (("  output_dir: out/student", "  output_dir: out/student\n  lora: true"), "merge_lora"),
        (("  eval_fraction: 0.1\n", "  eval_fraction: 0.1\n  shard: 0/2\n"), "generate.shard"),
        (("  output_dir: out/student", "  output_dir: out/student\n  overwrite: true"), "restart"),
    ],
)
def test_bad_recipes_are_refused_before_any_work(tmp_path, change, expected):
    with pytest.raises(ConfigError, match=expected):
        load_recipe(_write(tmp_path, BASE.replace(*change)))


def test_dry_run_prints_wired_sections(tmp_path):
    proc = run_cli("run", _write(tmp_path, BASE), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved) == {"generate", "train", "eval"}
    assert resolved["eval"]["student"] == "out/student"
    assert "eval.dataset = generate's held-out rows" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_section_fails_with_one_line_and_runs_nothing(tmp_path):
    recipe = _write(tmp_path, BASE.replace("  eval_fraction: 0.1\n", "  eval_fraction: 2\n"))
    proc = run_cli("run", recipe, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--eval-fraction" in lines[0] and str(recipe) in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_failing_stage_stops_the_recipe_with_its_status(tmp_path):
    """generate fails (its dataset is missing): train and eval must not start."""
    proc = run_cli("run", _write(tmp_path, BASE), cwd=tmp_path)
    assert proc.returncode == 1
    assert "data/prompts.jsonl" in proc.stderr  # generate's own error
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert "stage generate failed" in last and "train, eval did not run" in last
    assert not (tmp_path / "out" / "student").exists()


def test_eval_on_benchmarks_is_not_wired_to_held_out_rows(tmp_path):
    text = BASE.replace("  eval_fraction: 0.1\n", "").replace(
        "  output_dir: out/eval", "  output_dir: out/eval\n  benchmark: [math500, aime24]"
    )
    recipe = load_recipe(_write(tmp_path, text))
    ev = recipe.configs["eval"]
    assert ev.dataset is None and ev.benchmark == ["math500", "aime24"]
    assert ev.student == "out/student"


def test_shipped_math_recipes_evaluate_on_math500_and_aime24():
    for recipe in RECIPES:
        if recipe.name == "demo_cpu.yaml":
            continue
        ev = load_recipe(recipe).configs["eval"]
        assert ev.benchmark is not None and {"math500", "aime24"} <= set(ev.benchmark)
        assert ev.base, f"{recipe.name}: the untrained student belongs beside the student"
        if ev.num_samples > 1:
            assert ev.temperature > 0


# --- generate -> train -> on_policy -> eval -------------------------------------------------

ON_POLICY = BASE.replace(
    "eval:\n",
    "on_policy:\n  teacher: models/teacher\n  output_dir: out/student-on-policy\n  max_steps: 4\neval:\n",
)


def test_on_policy_stage_continues_the_trained_student(tmp_path):
    recipe = load_recipe(_write(tmp_path, ON_POLICY))
    assert list(recipe.configs) == ["generate", "train", "on_policy", "eval"]
    op = recipe.configs["on_policy"]
    assert op.loss == "on-policy" and op.beta == 1.0  # reverse KL unless said otherwise
    assert op.student == "out/student" and op.teacher == "models/teacher"
    assert op.dataset == "out/teacher.jsonl"  # generate's prompts
    assert recipe.configs["eval"].student == "out/student-on-policy"  # the final student
    assert "on_policy.student = the trained student (out/student)" in recipe.wiring
    assert "eval.student = the on-policy student (out/student-on-policy)" in recipe.wiring


def test_on_policy_teacher_defaults_to_a_loadable_generate_teacher(tmp_path):
    text = ON_POLICY.replace("  teacher: models/teacher\n", "").replace(
        "  teacher: mock-reverse\n  backend: mock\n", "  teacher: org/teacher-8b\n  backend: vllm\n"
    )
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe.configs["on_policy"].teacher == "org/teacher-8b"
    assert "on_policy.teacher = generate.teacher (org/teacher-8b)" in recipe.wiring


def test_on_policy_after_train_alone_reads_trains_dataset(tmp_path):
    text = (
        "train:\n  student: s\n  dataset: x.jsonl\n  output_dir: out/sft\n"
        "on_policy:\n  teacher: t\n  output_dir: out/op\n"
    )
    op = load_recipe(_write(tmp_path, text)).configs["on_policy"]
    assert (op.student, op.dataset) == ("out/sft", "x.jsonl")


def test_a_pinned_generate_teacher_revision_is_not_wired(tmp_path):
    text = ON_POLICY.replace("  teacher: models/teacher\n", "").replace(
        "  teacher: mock-reverse\n  backend: mock\n",
        "  teacher: org/t\n  revision: abc123\n  backend: vllm\n",
    )
    with pytest.raises(ConfigError, match="generate pins teacher revision abc123"):
        load_recipe(_write(tmp_path, text))


def test_on_policy_alone_needs_its_inputs_named(tmp_path):
    text = "on_policy:\n  student: s\n  teacher: t\n  dataset: d.jsonl\n  output_dir: out/op\n"
    recipe = load_recipe(_write(tmp_path, text))
    assert list(recipe.configs) == ["on_policy"] and recipe.wiring == []
    with pytest.raises(ConfigError, match=r"section 'on_policy': --student is required"):
        load_recipe(_write(tmp_path, text.replace("  student: s\n", "")))


@pytest.mark.parametrize(
    "change,expected",
    [
        (("  max_steps: 4\n", "  max_steps: 4\n  loss: hard\n"), "on_policy.loss: the on_policy"),
        (("  teacher: models/teacher\n", ""), "on_policy.teacher is needed: generate's teacher"),
        (("out/student-on-policy", "out/student"), "on_policy.output_dir out/student overlaps"),
        (("out/student-on-policy", "out/student/op"), "overlaps train.output_dir"),
        (
            ("  output_dir: out/student\n", "  output_dir: out/student\n  lora: true\n"),
            "train.lora saves an adapter.*on_policy.student",
        ),
        (("  max_steps: 4\n", "  max_steps: 4\n  kd_beta: 2\n"), "section 'on_policy': --kd-beta"),
        (
            ("  max_steps: 4\n", "  max_steps: 4\n  kd_bta: 1\n"),
            "unknown key 'kd_bta' in section 'on_policy'",
        ),
        (("  max_steps: 4\n", "  max_steps: 4\n  overwrite: true\n"), "on_policy.overwrite"),
    ],
)
def test_bad_on_policy_sections_are_refused_before_any_work(tmp_path, change, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        load_recipe(_write(tmp_path, ON_POLICY.replace(*change)))
    assert "\n" not in str(err.value)


def test_dry_run_prints_the_four_stages_in_order(tmp_path):
    proc = invoke("run", _write(tmp_path, ON_POLICY), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert list(resolved) == ["generate", "train", "on_policy", "eval"]
    assert resolved["on_policy"]["loss"] == "on-policy"
    assert resolved["eval"]["student"] == "out/student-on-policy"


def test_on_policy_stage_errors_name_its_recipe_keys():
    env = {RECIPE_ENV: "r.yaml", STAGE_ENV: "on_policy"}
    text = in_recipe_terms("--max-completion-length 600 too long; pass --overwrite", env)
    assert text == "on_policy.max_completion_length 600 too long; delete on_policy.output_dir"


@pytest.mark.slow
def test_recipe_chains_generate_train_on_policy_eval_and_resumes(tiny_model, tmp_path):
    """Mock teacher labels, 2 hard-label steps, then the on-policy stage fails (its teacher is
    missing) and eval does not start; once the teacher is there, the rerun labels nothing,
    trains no hard-label step again, runs 2 on-policy steps scored by a copy of the tiny model
    and evaluates the on-policy student."""
    from openkd.tiny import make_prompts

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in make_prompts(24)])
    common = "  batch_size: 4\n  max_length: 64\n  logging_steps: 1\n  save_steps: 2\n"
    recipe = _write(
        tmp_path,
        f"""
generate:
  teacher: mock-reverse
  backend: mock
  dataset: prompts.jsonl
  output: out/teacher.jsonl
  eval_fraction: 0.25
  max_new_tokens: 16
train:
  student: {tiny_model}
  output_dir: out/student
  max_steps: 2
{common}on_policy:
  teacher: teacher
  output_dir: out/student-on-policy
  max_steps: 2
  max_completion_length: 8
{common}eval:
  backend: transformers
  max_samples: 4
  output_dir: out/eval
""",
    )
    env = {"OMP_NUM_THREADS": "1"}
    first = run_cli("run", recipe, cwd=tmp_path, env=env)
    assert first.returncode == 1, first.stderr[-3000:]
    last = [ln for ln in first.stderr.splitlines() if ln.strip()][-1]
    assert "stage on_policy failed" in last and "eval did not run" in last
    assert (tmp_path / "out" / "student" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "eval").exists()

    shutil.copytree(tiny_model, tmp_path / "teacher")
    again = run_cli("run", recipe, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    log = " ".join(again.stderr.split())
    assert "nothing to label" in log
    assert log.count("training is complete") == 1  # train's; on_policy trained its 2 steps
    op = tmp_path / "out" / "student-on-policy"
    card = (op / "README.md").read_text()
    assert "on-policy" in card and "teacher" in card
    resolved = yaml.safe_load((op / "openkd_train.yaml").read_text())["train"]
    assert resolved["student"] == "out/student" and resolved["loss"] == "on-policy"
    assert json.loads((op / "openkd_run.json").read_text())["results"]["global_step"] == 2
    report = (tmp_path / "out" / "eval" / "report.json").read_text()
    assert "out/student-on-policy" in report  # eval scored the final student
