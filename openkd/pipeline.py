"""`openkd run RECIPE.yaml`: generate, train, on-policy and eval from one file, resumable end to end.

A recipe holds any of the sections `generate:`, `train:` (hard, soft or mix labels),
`on_policy:` (`openkd train` keys; `loss: on-policy` implied) and `eval:`, run in that order.

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
from openkd.errors import PREEMPTED, ConfigError, OpenkdError
from openkd.eval.config import EvalConfig
from openkd.generate.config import GenerateConfig
from openkd.train.config import TrainConfig

STAGES: dict[str, type[StageConfig]] = {
    "generate": GenerateConfig,
    "train": TrainConfig,
    "on_policy": TrainConfig,  # a second `openkd train`, on the student's own samples
    "eval": EvalConfig,
}
# The command a stage runs, where it is not the stage's name.
COMMANDS = {"on_policy": "train"}
# Set for a stage that `openkd run` starts: the recipe, and the stage's section in it.
RECIPE_ENV = "OPENKD_RECIPE"
STAGE_ENV = "OPENKD_RECIPE_STAGE"
# What a stage wrote, to delete where a stage alone would say --overwrite (a recipe refuses it).
OUTPUTS = {
    "generate": "generate.output and its side files",
    "train": "train.output_dir",
    "on_policy": "on_policy.output_dir",
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
        generate = _validate(GenerateConfig, gen_values, path, "generate")
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
        train = _validate(TrainConfig, train_values, path, "train")
        problems += _train_problems(train, "train")
        recipe.configs["train"] = train

    final = train  # the stage whose student eval scores
    if sections.get("on_policy") is not None:
        final = _wire_on_policy(dict(sections["on_policy"]), generate, train, recipe, problems)

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
        if "student" not in eval_values and final is not None:
            section = "on_policy" if final is not train else "train"
            student = _trained_student(final, problems, section, "eval.student")
            eval_values["student"] = str(student)
            what = "on-policy" if section == "on_policy" else "trained"
            recipe.wiring.append(f"eval.student = the {what} student ({student})")
        recipe.configs["eval"] = _validate(EvalConfig, eval_values, path, "eval")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return recipe


def _train_problems(train: TrainConfig, section: str) -> list[str]:
    if train.overwrite:
        return [
            f"{section}.overwrite: true would restart training from step 0 on each rerun; "
            f"remove it (delete {section}.output_dir to start over)"
        ]
    return []


def _wire_on_policy(
    values: dict[str, Any],
    generate: GenerateConfig | None,
    train: TrainConfig | None,
    recipe: Recipe,
    problems: list[str],
) -> TrainConfig:
    """The on_policy section: `openkd train --loss on-policy`, continuing train's student."""
    loss = values.setdefault("loss", "on-policy")
    if loss != "on-policy":
        problems.append(
            f"on_policy.loss: the on_policy section trains with loss on-policy, not {loss}; "
            "drop the key (hard, soft and mix labels belong in the train: section)"
        )
        values["loss"] = "on-policy"
    if "student" not in values and train is not None:
        student = _trained_student(train, problems, "train", "on_policy.student")
        values["student"] = str(student)
        recipe.wiring.append(f"on_policy.student = the trained student ({student})")
    prompts = (
        ("generate.output", str(generate.output))
        if generate is not None
        else ("train.dataset", train.dataset)
        if train is not None
        else None
    )
    if "dataset" not in values and prompts is not None:
        values["dataset"] = prompts[1]
        recipe.wiring.append(f"on_policy.dataset = {prompts[0]}'s prompts ({prompts[1]})")
    if "teacher" not in values and generate is not None:
        teacher = _loadable_teacher(generate, problems)
        values["teacher"] = teacher
        if teacher != "<missing>":
            recipe.wiring.append(f"on_policy.teacher = generate.teacher ({teacher})")
    on_policy = _validate(TrainConfig, values, recipe.path, "on_policy")
    problems += _train_problems(on_policy, "on_policy")
    if train is not None and _nested(Path(train.output_dir), Path(on_policy.output_dir)):
        problems.append(
            f"on_policy.output_dir {on_policy.output_dir} overlaps train.output_dir "
            f"{train.output_dir}: each training stage needs its own directory; set "
            "on_policy.output_dir (e.g. a sibling ending in -on-policy)"
        )
    recipe.configs["on_policy"] = on_policy
    return on_policy


def _loadable_teacher(generate: GenerateConfig, problems: list[str]) -> str:
    """generate's teacher where it names a model on-policy training can load, else a problem."""
    local = generate.backend in ("vllm", "transformers") or (
        generate.backend == "openai" and generate.serve
    )
    if not local:
        problems.append(
            f"on_policy.teacher is needed: generate's teacher {generate.teacher!r} (backend "
            f"{generate.backend}{'' if generate.backend == 'mock' else ', served elsewhere'}) "
            "is not a model openkd loads; set on_policy.teacher to a local path or Hub id "
            "sharing the student's tokenizer"
        )
        return "<missing>"
    if generate.revision:
        problems.append(
            f"on_policy.teacher is needed: generate pins teacher revision {generate.revision}, "
            "which on-policy training does not take; set on_policy.teacher to a local copy "
            "of that revision"
        )
    return generate.teacher


def _nested(a: Path, b: Path) -> bool:
    a, b = a.expanduser().absolute(), b.expanduser().absolute()
    return a == b or a in b.parents or b in a.parents


def _trained_student(train: TrainConfig, problems: list[str], section: str, consumer: str) -> Path:
    """The folder a training stage leaves its final student in, for the next stage to read."""
    if train.lora and not train.merge_lora:
        problems.append(
            f"{section}.lora saves an adapter, which the next stage cannot load on its own: "
            f"set {section}.merge_lora: true or {consumer}"
        )
    if train.lora and train.merge_lora:
        from openkd.train.finish import MERGED_DIR

        return Path(train.output_dir) / MERGED_DIR
    return Path(train.output_dir)


def _validate(cls: type[StageConfig], values: dict[str, Any], path: Path, section: str) -> Any:
    try:
        return validate(cls, values, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: section '{section}': {exc}") from exc


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
    command = COMMANDS.get(name, name)
    status = run_child(
        [sys.executable, "-m", "openkd", command, "--config", str(config_file)], env=env
    )
    if status == 0:
        return
    skipped = f"; {', '.join(remaining)} did not run" if remaining else ""
    if status == PREEMPTED:  # training saved a checkpoint on SIGTERM/SIGUSR1
        raise StageFailed(
            f"{name} was preempted (its checkpoint is saved){skipped}; rerun `openkd run "
            f"{recipe}` to resume",
            PREEMPTED,
        )
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
