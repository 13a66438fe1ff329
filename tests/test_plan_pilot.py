"""`openkd plan pilot`: the sweep from a recipe, and the proof on real tiny students.

The proof (slow): 3 tiny student sizes x 3 step budgets distilled from the mock reverse
teacher on CPU, the law fitted to their eval cross-entropies, then a held-out larger student
trained and scored the same way; the prediction for it must be within 15 %. The README's
"Choosing a student" reports the measured error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import error_line, invoke
from tests.plan_helpers import write_grid

RECIPE = """\
generate:
  teacher: mock-reverse
  backend: mock
  mock_rule: reverse
  dataset: prompts.jsonl
  output: labels/teacher.jsonl
  eval_fraction: 0.1
  max_new_tokens: 32
train:
  learning_rate: 1.0e-3
  lr_scheduler_type: constant_with_warmup
  warmup_ratio: 0.05
  batch_size: 32
  max_length: 64
  save_steps: 10000
  logging_steps: 10
eval:
  backend: transformers
  max_samples: 48
plan_pilot:
  hidden_sizes: [64, 96, 128]
  max_steps: [10, 20, 40]
  output_dir: pilots
  teacher_loss: 0
  bootstrap: 50
"""


def _work(tmp_path: Path, recipe: str = RECIPE, prompts: int = 800) -> Path:
    from openkd.tiny import make_prompts

    (tmp_path / "recipe.yaml").write_text(recipe)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in make_prompts(prompts))
    )
    return tmp_path


def test_dry_run_lists_the_pilots_without_running_anything(tmp_path: Path):
    work = _work(tmp_path)
    proc = invoke(
        "plan", "pilot", work / "recipe.yaml", "--max-steps", "5", "--max-steps", "9", "--dry-run"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "- h64-s5\n- h64-s9\n- h96-s5" in proc.stdout and "h128-s9" in proc.stdout
    assert not (work / "pilots").exists() and not (work / "labels").exists()


@pytest.mark.parametrize(
    "recipe,args,message",
    [
        ("generate:\n  teacher: t\n  backend: mock\n  dataset: p.jsonl\n  output: o.jsonl\n", ["--hidden-sizes", "64", "--max-steps", "5"],
         "a pilot sweep needs the recipe's train and eval: section(s)"),
        (RECIPE, ["--students", "a"], "--students and --hidden-sizes: pass one"),
        (RECIPE.replace("  max_steps: [10, 20, 40]\n", ""), [], "--max-steps is required"),
        (RECIPE.replace("hidden_sizes: [64, 96, 128]", "hidden_sizes: [64, 100]"), [], "--hidden-sizes multiples of 32"),
        (RECIPE + "  colour: blue\n", [], "unknown key 'colour' in section 'plan_pilot'; see `openkd plan pilot --help`"),
    ],
)  # fmt: skip
def test_bad_sweeps_are_refused_in_one_line(tmp_path: Path, recipe, args, message):
    work = _work(tmp_path, recipe)
    proc = invoke("plan", "pilot", work / "recipe.yaml", *args)
    assert proc.returncode != 0
    assert message in error_line(proc.stderr)
    assert not (work / "pilots").exists()


@pytest.mark.slow  # loads a tiny teacher with transformers
def test_teacher_model_measures_the_teacher_loss(tmp_path: Path, tiny_model: Path):
    pilots = write_grid(tmp_path / "pilots")
    fit = tmp_path / "fit.json"
    proc = invoke(
        "plan", "fit", *pilots, "--teacher-model", tiny_model, "--bootstrap", "0", "--output", fit
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("measuring L_T") == 1  # one held-out set, measured once
    teachers = {p["L_T"] for p in json.loads(fit.read_text())["pilots"]}
    assert len(teachers) == 1
    (lt,) = teachers
    assert 0 < lt < 20  # a random tiny model: near log(vocabulary) nats per token
    held_out = pilots[0] / "eval" / "examples.jsonl"
    proc = invoke(
        "plan", "--fit", fit, "--teacher-model", tiny_model, "--held-out", held_out,
        "--students", "1M", "--tokens", "4M", "--output-dir", tmp_path / "plan", "--no-plot",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["teacher"]["L_T"] == pytest.approx(lt)
    assert plan["teacher"]["N_T"] > 0  # from the teacher's config.json


@pytest.mark.slow
@pytest.mark.long  # 10 tiny trainings and evaluations on CPU: 6-13 minutes here
def test_real_tiny_sweep_predicts_a_held_out_larger_student(tmp_path: Path):
    from openkd.plan.pilots import read_report_pilot

    work = _work(tmp_path)
    swept = run_cli("plan", "pilot", "recipe.yaml", cwd=work, timeout=3600)
    assert swept.returncode == 0, swept.stderr[-3000:]
    fit = work / "pilots" / "fit.json"
    assert swept.stdout.strip().splitlines()[-1] == str(fit)
    data = json.loads(fit.read_text())
    assert len(data["distillation"]["residuals"]) == 9
    # A rerun finds every pilot done and only refits.
    again = run_cli("plan", "pilot", "recipe.yaml", cwd=work, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done, skipped") == 9

    held = run_cli(
        "plan", "pilot", "recipe.yaml", "--hidden-sizes", "192", "--max-steps", "40",
        "--output-dir", "heldout", "--no-fit", cwd=work, timeout=1800,
    )  # fmt: skip
    assert held.returncode == 0, held.stderr[-3000:]
    pilot = read_report_pilot(str(work / "heldout" / "h192-s40"))
    predicted = run_cli(
        "plan", "--fit", fit, "--teacher-loss", "0", "--students", str(pilot.n),
        "--tokens", str(pilot.d), "--output-dir", "prediction", cwd=work,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    cell = json.loads((work / "prediction" / "plan.json").read_text())["grid"][0]
    error = (cell["L_S"] - pilot.loss) / pilot.loss
    print(
        f"held-out h192 at 40 steps: N_S {pilot.n:.4g}, D_S {pilot.d:.4g}, measured L_S "
        f"{pilot.loss:.4f}, predicted {cell['L_S']:.4f} (90 %: {cell['L_S_interval_90']}), "
        f"error {100 * error:+.1f} %; fit residuals max "
        f"{100 * data['distillation']['relative_error']['max_abs']:.1f} %"
    )
    assert cell["extrapolation"]["N_S"] > 2  # larger than every pilot, and flagged as such
    assert abs(error) < 0.15
