"""`openkd run RECIPE`: shipped recipes validate, outputs are wired to inputs, failures stop it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from openkd.errors import ConfigError
from openkd.pipeline import load_recipe
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert "demo_cpu.yaml" in names
    assert len(names) >= 3  # the CPU demo and at least two GPU recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_every_section(recipe: Path):
    loaded = load_recipe(recipe)
    assert list(loaded.configs) == ["generate", "train", "eval"]
    gen, train, ev = (loaded.configs[k] for k in ("generate", "train", "eval"))
    if gen.num_samples > 1:  # rejection sampling: samples differ only if the teacher samples
        assert gen.verify and gen.temperature > 0
    else:
        assert gen.temperature == 0.0  # hard labels: greedy
    assert train.dataset == str(gen.output)
    assert ev.student == str(train.output_dir)
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
