"""`openkd plan pilot RECIPE`: the pilot sweep, then the fit.

The recipe's generate section labels once; then every student size trains once per --max-steps
value with the recipe's train settings, into `<output_dir>/<size>-s<steps>/student`, and is
scored by the recipe's eval settings into `.../eval` (without `base`: pilots need only the
student's NLL). Each stage runs as its own `openkd` process, like `openkd run`, so a rerun
resumes: labels are kept, training continues from its checkpoints, and a pilot whose eval
report is newer than its student is skipped. Last, `openkd plan fit` on all of them writes
`<output_dir>/fit.json`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from openkd import console
from openkd.config import read_config_file, read_section, save_resolved
from openkd.errors import PREEMPTED, ConfigError, OpenkdError
from openkd.plan.config import FitConfig, PilotConfig

REPORT = "report.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class Stopped(OpenkdError):
    """A stage was interrupted (Ctrl-C, SIGTERM): exit like an interrupted openkd command."""

    exit_code = 130


@dataclass(frozen=True)
class PilotRun:
    """One pilot: a student size trained for a number of steps, where it goes."""

    name: str
    student: str
    steps: int
    root: Path

    @property
    def student_dir(self) -> Path:
        return self.root / "student"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def done(self, train: Any, evaluate: Any) -> bool:
        """Its eval report exists, is newer than the student's weights, and both were made
        with these settings (anything else reruns the stages, which resume or refuse)."""
        from openkd.data.metadata import redact
        from openkd.train.finish import RESOLVED_CONFIG

        report_path = self.eval_dir / REPORT
        weights = [self.student_dir / w for w in WEIGHTS if (self.student_dir / w).is_file()]
        if not report_path.is_file() or not weights:
            return False
        if any(report_path.stat().st_mtime < w.stat().st_mtime for w in weights):
            return False
        try:
            trained = yaml.safe_load(
                (self.student_dir / RESOLVED_CONFIG).read_text(encoding="utf-8")
            )
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
            return False
        return (trained or {}).get("train") == train.to_yaml_dict() and report.get(
            "config"
        ) == redact(evaluate.to_yaml_dict())


def _size_name(spec: str) -> str:
    name = Path(spec.rstrip("/")).name or spec
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def tiny_students(cfg: PilotConfig, out: Path) -> list[tuple[str, str]]:
    """(name, directory) of each --hidden-sizes student, built once by make-tiny."""
    from openkd.tiny.command import TinyOptions, make_tiny
    from openkd.tiny.model import MARKER

    students = []
    for h in cfg.hidden_sizes:
        target = out / "students" / f"h{h}"
        if not (target / MARKER).is_file():
            make_tiny(
                target,
                TinyOptions(hidden_size=h, layers=cfg.tiny_layers),
                prompts=None,
                overwrite=False,
            )
        students.append((f"h{h}", str(target)))
    return students


def plan_runs(cfg: PilotConfig, out: Path, students: list[tuple[str, str]]) -> list[PilotRun]:
    names = [name for name, _ in students]
    if len(set(names)) != len(names):
        raise ConfigError(
            "--students: two students have the same directory name; give each size its own name"
        )
    return [
        PilotRun(name=f"{name}-s{steps}", student=path, steps=steps, root=out / f"{name}-s{steps}")
        for name, path in students
        for steps in sorted(set(cfg.max_steps))
    ]


def recipe_sections(recipe: Path) -> dict[str, dict[str, Any]]:
    """The recipe's generate, train and eval sections (train and eval required)."""
    from openkd.pipeline import STAGES

    data = read_config_file(recipe, given_as="recipe")
    sections = {
        name: read_section(recipe, name, set(cls.model_fields), cls.removed, given_as="recipe")
        for name, cls in STAGES.items()
        if name in data and name != "on_policy"  # pilots compare students before on-policy
    }
    missing = [name for name in ("train", "eval") if name not in sections]
    if missing:
        raise ConfigError(
            f"{recipe}: a pilot sweep needs the recipe's {' and '.join(missing)}: section(s), "
            "whose settings every pilot uses"
        )
    return sections


def wire_pilot(sections: dict[str, dict[str, Any]], recipe: Path, run: PilotRun) -> Any:
    """The pilot's validated generate/train/eval configs, wired like `openkd run` wires them."""
    from openkd.pipeline import wire

    pilot = {name: dict(body) for name, body in sections.items()}
    pilot["train"].update(student=run.student, output_dir=str(run.student_dir), max_steps=run.steps)
    for key in ("student", "base"):
        pilot["eval"].pop(key, None)
    pilot["eval"]["output_dir"] = str(run.eval_dir)
    return wire(pilot, recipe)


def _stage(name: str, config: Any, recipe: Path, what: str) -> None:
    from openkd.pipeline import RECIPE_ENV, STAGE_ENV
    from openkd.train.launch import run_child

    with tempfile.TemporaryDirectory(prefix="openkd-pilot-") as tmp:
        config_file = Path(tmp) / f"{name}.yaml"
        save_resolved(config, config_file)
        env = {**os.environ, RECIPE_ENV: str(recipe), STAGE_ENV: name}
        status = run_child(
            [sys.executable, "-m", "openkd", name, "--config", str(config_file)], env=env
        )
    if status in (130, 128 + 15, -2, -15, PREEMPTED):  # PREEMPTED: a checkpoint is kept
        raise Stopped(
            f"stopped during {what}; rerun `openkd plan pilot {recipe}` to continue where it stopped"
        )
    if status != 0:
        raise OpenkdError(
            f"{what} failed (exit status {status}; its error is above); fix it and rerun "
            f"`openkd plan pilot {recipe}`: finished pilots are kept and skipped"
        )


def run_pilot(recipe: Path, cfg: PilotConfig, *, dry_run: bool = False) -> None:
    out = Path(cfg.output_dir).expanduser().absolute()
    sections = recipe_sections(recipe)
    if dry_run:
        names = [f"h{h}" for h in cfg.hidden_sizes] or [_size_name(s) for s in cfg.students]
        runs = plan_runs(cfg, out, list(zip(names, cfg.hidden_sizes or cfg.students, strict=True)))  # type: ignore[arg-type]
        sys.stdout.write(
            yaml.safe_dump(
                {"plan_pilot": cfg.to_yaml_dict(), "pilots": [r.name for r in runs]},
                sort_keys=False,
            )
        )
        return
    students = (
        tiny_students(cfg, out) if cfg.hidden_sizes else [(_size_name(s), s) for s in cfg.students]
    )
    runs = plan_runs(cfg, out, students)
    wired = {
        run.name: wire_pilot(sections, recipe, run) for run in runs
    }  # all checked before any work
    if "generate" in sections:
        console.console.rule(f"openkd plan pilot: labels ({recipe.name})")
        _stage("generate", wired[runs[0].name].configs["generate"], recipe, "generate")
    for i, run in enumerate(runs, start=1):
        configs = wired[run.name].configs
        if run.done(configs["train"], configs["eval"]):
            console.info(f"pilot {i}/{len(runs)} {run.name}: done, skipped")
            continue
        console.console.rule(f"openkd plan pilot {i}/{len(runs)}: {run.name}")
        _stage("train", configs["train"], recipe, f"pilot {run.name}: train")
        _stage("eval", configs["eval"], recipe, f"pilot {run.name}: eval")
    if not cfg.fit:
        for run in runs:
            console.stdout_line(str(run.eval_dir / REPORT))
        return
    from openkd.plan.run import run_fit

    fit = FitConfig(
        pilots=[str(run.eval_dir) for run in runs],
        teacher_loss=cfg.teacher_loss,
        teacher_model=cfg.teacher_model,
        fix=cfg.fix,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        output=out / "fit.json",
    )
    console.console.rule(f"openkd plan pilot: fit on {len(runs)} pilots")
    run_fit(fit)
