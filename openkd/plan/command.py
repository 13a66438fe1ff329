"""The `openkd plan` Typer sub-app: predict (the group's own options), `fit` and `pilot`.

Options come from the typed configs (`openkd.flags.config_command`) as for every stage; this
module only adds what a sub-app needs: the predict command runs when no subcommand is given,
`fit` takes its pilots as arguments, and `pilot` takes the recipe as its config file.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml

from openkd.config import StageConfig, resolve
from openkd.flags import config_command
from openkd.plan.config import FitConfig, PilotConfig, PlanConfig

app = typer.Typer(
    name="plan",
    help=PlanConfig.__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _runner(
    cls: type[StageConfig], target: str
) -> Callable[[Path | None, bool, dict[str, Any]], None]:
    def run(config_file: Path | None, dry_run: bool, overrides: dict[str, Any]) -> None:
        cfg = resolve(cls, config_file, overrides)
        if dry_run:
            sys.stdout.write(yaml.safe_dump({cls.section: cfg.to_yaml_dict()}, sort_keys=False))
            return
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(cfg)

    return run


def _with(
    command: Callable[..., None], first: list[inspect.Parameter], drop: tuple[str, ...] = ()
) -> list[inspect.Parameter]:
    """`first`, then `command`'s parameters without `drop`."""
    rest = [p for name, p in inspect.signature(command).parameters.items() if name not in drop]
    return [*first, *rest]


_predict = config_command(PlanConfig, _runner(PlanConfig, "openkd.plan.run:run_predict"))


def predict(ctx: typer.Context, **kwargs: Any) -> None:
    if ctx.invoked_subcommand is None:
        _predict(**kwargs)


predict.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    _with(
        _predict,
        [
            inspect.Parameter(
                "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
            )
        ],
    )
)
app.callback(invoke_without_command=True, help=PlanConfig.__doc__)(predict)

_fit = config_command(FitConfig, _runner(FitConfig, "openkd.plan.run:run_fit"))


def fit(**kwargs: Any) -> None:
    _fit(**kwargs)


fit.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    _with(
        _fit,
        [
            inspect.Parameter(
                "pilots",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Argument(
                    None,
                    help="Pilot runs: openkd eval reports (report.json or its directory; a "
                    "directory with eval/report.json), or JSONL files of runs.",
                    show_default=False,
                ),
                annotation=list[str] | None,
            )
        ],
        drop=("pilots",),
    )
)
app.command("fit", help=FitConfig.__doc__)(fit)


def _run_pilot(config_file: Path | None, dry_run: bool, overrides: dict[str, Any]) -> None:
    from openkd.plan.sweep import run_pilot

    assert config_file is not None
    cfg = resolve(PilotConfig, config_file, overrides)
    run_pilot(config_file, cfg, dry_run=dry_run)


_pilot = config_command(PilotConfig, _run_pilot)


def pilot(recipe: Path, **kwargs: Any) -> None:
    _pilot(config=recipe, **kwargs)


pilot.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    _with(
        _pilot,
        [
            inspect.Parameter(
                "recipe",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=typer.Argument(
                    ...,
                    help="Recipe YAML with generate:, train: and eval: sections (as for openkd "
                    "run) and an optional plan_pilot: section with these options.",
                ),
                annotation=Path,
            )
        ],
        drop=("config",),
    )
)
app.command("pilot", help=PilotConfig.__doc__)(pilot)
