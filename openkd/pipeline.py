"""`openkd run RECIPE.yaml`: generate, train and eval from one file, resumable end to end.

All sections are validated, and outputs wired to inputs, before any stage starts. Each stage
then runs as its own `openkd <stage> --config ...` process, so a stage's GPU memory (a vLLM
engine, a DeepSpeed job) is released before the next begins, and each stage resumes on its
own: generation skips labelled rows, training continues from its newest checkpoint, and
evaluation reuses a report computed from the same inputs. Rerunning after a crash therefore
continues where it stopped. Each stage prints its result path on stdout.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openkd import console
from openkd.config import SECTIONS, StageConfig, read_section, save_resolved, validate
from openkd.errors import ConfigError, OpenkdError
from openkd.eval.config import EvalConfig
from openkd.generate.config import GenerateConfig
from openkd.train.config import TrainConfig

STAGES: dict[str, type[StageConfig]] = {
    "generate": GenerateConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
# Set for a stage that `openkd run` starts: the recipe, and the stage's section in it.
RECIPE_ENV = "OPENKD_RECIPE"
STAGE_ENV = "OPENKD_RECIPE_STAGE"
# What a stage wrote, to delete where a stage alone would say --overwrite (a recipe refuses it).
OUTPUTS = {
    "generate": "generate.output and its side files",
    "train": "train.output_dir",
    "eval": "eval.output_dir",
}


class StageFailed(OpenkdError):
    """A stage exited non-zero; `openkd run` exits with the stage's status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Recipe:
    """The validated configs of the stages a recipe holds, in order, and how they were wired."""

    path: Path
    configs: dict[str, StageConfig] = field(default_factory=dict)
    wiring: list[str] = field(default_factory=list)


def read_recipe(path: Path) -> dict[str, dict[str, Any]]:
    """Each section's own keys (unknown sections and keys are ConfigErrors naming them)."""
    sections = {
        name: read_section(path, name, set(cls.model_fields), cls.removed, given_as="recipe")
        for name, cls in STAGES.items()
    }
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    present = {name: body for name, body in sections.items() if name in data}
    if not present:
        raise ConfigError(
            f"{path}: a recipe needs at least one of the sections {', '.join(STAGES)}"
        )
    for name in SECTIONS:
        if name in data and name not in STAGES:
            console.warn(
                f"{path}: `openkd run` does not run the {name}: section; run "
                + (
                    f"`openkd plan pilot {path}` for it"
                    if name == "plan_pilot"
                    else f"`openkd {name.replace('_', ' ')} --config {path}` first"
                )
            )
    return present


def eval_file(output: Path) -> Path:
    """The held-out file `openkd generate --eval-fraction` writes beside `output`."""
    from openkd.data.layout import OutputFiles

    return OutputFiles(Path(output)).eval


def wire(sections: dict[str, dict[str, Any]], path: Path) -> Recipe:
    """Fill the inputs a recipe leaves out from the previous stages' outputs, then validate."""
    recipe = Recipe(path=path)
    gen_values = sections.get("generate")
    train_values = sections.get("train")
    eval_values = sections.get("eval")
    problems: list[str] = []

    generate = None
    if gen_values is not None:
        generate = _validate(GenerateConfig, gen_values, path)
        if generate.shard is not None:
            problems.append(
                "generate.shard: a recipe labels the whole dataset in one run; drop `shard` "
                "(for sharded labelling use `openkd generate --shard` and `openkd merge`)"
            )
        if generate.overwrite:
            problems.append(
                "generate.overwrite: true would relabel every prompt on each rerun of the "
                "recipe; remove it (delete the output files to start over)"
            )
        recipe.configs["generate"] = generate

    train = None
    if train_values is not None:
        train_values = dict(train_values)
        if "dataset" not in train_values and generate is not None:
            train_values["dataset"] = str(generate.output)
            recipe.wiring.append(f"train.dataset = generate.output ({generate.output})")
        train = _validate(TrainConfig, train_values, path)
        if train.overwrite:
            problems.append(
                "train.overwrite: true would restart training from step 0 on each rerun; "
                "remove it (delete train.output_dir to start over)"
            )
        recipe.configs["train"] = train

    if eval_values is not None:
        eval_values = dict(eval_values)
        benchmarks = "benchmark" in eval_values  # scored on gold answers, not held-out rows
        if "dataset" not in eval_values and not benchmarks and generate is not None:
            if generate.eval_fraction > 0:
                held_out = eval_file(generate.output)
                eval_values["dataset"] = str(held_out)
                recipe.wiring.append(f"eval.dataset = generate's held-out rows ({held_out})")
            else:
                problems.append(
                    "eval has no held-out prompts: set generate.eval_fraction (e.g. 0.05), "
                    "eval.dataset, or eval.benchmark (e.g. [math500, aime24])"
                )
                eval_values["dataset"] = "<missing>"
        if "student" not in eval_values and train is not None:
            student = _trained_student(train, problems)
            eval_values["student"] = str(student)
            recipe.wiring.append(f"eval.student = the trained student ({student})")
        recipe.configs["eval"] = _validate(EvalConfig, eval_values, path)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return recipe


def _trained_student(train: TrainConfig, problems: list[str]) -> Path:
    if train.lora and not train.merge_lora:
        problems.append(
            "train.lora saves an adapter, which eval backends cannot serve on its own: set "
            "train.merge_lora: true or eval.student"
        )
    if train.lora and train.merge_lora:
        from openkd.train.results import MERGED_DIR

        return Path(train.output_dir) / MERGED_DIR
    return Path(train.output_dir)


def _validate(cls: type[StageConfig], values: dict[str, Any], path: Path) -> Any:
    try:
        return validate(cls, values, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: section '{cls.section}': {exc}") from exc


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    return wire(read_recipe(path), path)


def resolved_yaml(recipe: Recipe) -> str:
    data = {name: cfg.to_yaml_dict() for name, cfg in recipe.configs.items()}
    return yaml.safe_dump(data, sort_keys=False)


def run_recipe(path: Path, *, dry_run: bool = False) -> None:
    """Validate every section, then run the stages in order; stop at the first failure."""
    recipe = load_recipe(path)
    for line in recipe.wiring:
        console.info(f"recipe: {line}")
    if dry_run:
        sys.stdout.write(resolved_yaml(recipe))
        return
    names = list(recipe.configs)
    with tempfile.TemporaryDirectory(prefix="openkd-run-") as tmp:
        for i, name in enumerate(names, start=1):
            console.console.rule(f"openkd run {path.name}: stage {i}/{len(names)}, {name}")
            config_file = Path(tmp) / f"{name}.yaml"
            save_resolved(recipe.configs[name], config_file)
            _run_stage(name, config_file, path, remaining=names[i:])
    console.console.rule(f"openkd run {path.name}: all {len(names)} stages done")


def _run_stage(name: str, config_file: Path, recipe: Path, remaining: list[str]) -> None:
    from openkd.train.launch import run_child

    env = {**os.environ, RECIPE_ENV: str(recipe), STAGE_ENV: name}
    status = run_child(
        [sys.executable, "-m", "openkd", name, "--config", str(config_file)], env=env
    )
    if status == 0:
        return
    skipped = f"; {', '.join(remaining)} did not run" if remaining else ""
    if status in (130, 128 + 15, -2, -15):
        raise StageFailed(
            f"stopped during {name}{skipped}; rerun `openkd run {recipe}` to continue where it "
            "stopped",
            130,
        )
    how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
    raise StageFailed(
        f"stage {name} failed ({how}; its error is above){skipped}; fix it and rerun "
        f"`openkd run {recipe}`: finished work is kept and skipped",
        status if 0 < status < 256 else 1,
    )


def in_recipe_terms(message: str, env: dict[str, str] | None = None) -> str:
    """A stage's error as the user of `openkd run` can act on it: the stage's flags become keys
    of its recipe section (--max-new-tokens -> generate.max_new_tokens), and --overwrite, which
    a recipe refuses, becomes deleting the stage's outputs. Unchanged outside a recipe."""
    env = dict(os.environ) if env is None else env
    stage = env.get(STAGE_ENV, "")
    if not env.get(RECIPE_ENV) or stage not in STAGES:
        return message
    fields = STAGES[stage].model_fields
    delete = f"delete {OUTPUTS[stage]}"
    text = re.sub(r"\b(?:re)?run with --overwrite\b", f"{delete}, then rerun", message)
    text = re.sub(r"\bpass --overwrite\b", delete, text)
    text = re.sub(r"--overwrite\b", delete, text)

    def key(match: re.Match[str]) -> str:
        verb, article, name = match.group(1) or "", match.group(2) or "", match.group(3)
        if name.replace("-", "_") not in fields:
            return match.group(0)
        if verb == "pass " or (verb and article):
            verb = verb.replace("pass ", "") + "set "
        return f"{verb}{article}{stage}.{name.replace('-', '_')}"

    return re.sub(r"(?<![\w-])(pass |or )?(another |an? )?--([a-z][a-z0-9-]*)", key, text)
