"""Turn a stage config class into Typer options, so help text is written once, on the field.

Every flag defaults to None ("not passed"), which lets `config.resolve` tell a flag the user
typed from a default, and so lets flags override YAML without clobbering it.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic.fields import FieldInfo

from openkd.config import StageConfig, flag_name


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        # e.g. `str | Path` or `bool | Literal[...]`: take it as text and let pydantic decide.
        return str
    return annotation


def _is_cli_field(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("cli") is False)


def _help(name: str, info: FieldInfo) -> str:
    text = info.description or ""
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        if default not in (None, [], {}):
            if isinstance(default, bool):
                default = flag_name(name) if default else flag_name(name).replace("--", "--no-", 1)
            text += f" [default: {default}]"
    else:
        text += " [required]"
    return text


def option_parameter(name: str, info: FieldInfo) -> inspect.Parameter:
    """One typed Typer option for one config field."""
    base = _unwrap_optional(info.annotation)
    help_text = _help(name, info)
    flag = flag_name(name)
    kwargs: dict[str, Any] = {"help": help_text, "show_default": False}
    if base is bool:
        decls = [f"{flag}/--no-{flag[2:]}"]
        annotation: Any = bool | None
    elif typing.get_origin(base) is Literal:
        decls = [flag]
        choices = [str(v) for v in typing.get_args(base)]
        # Typer shows a Literal's values as choices when they come as an Enum.
        choice_enum: Any = enum.Enum(f"{name}_choices", {c: c for c in choices}, type=str)  # type: ignore[misc]
        annotation = choice_enum | None
    elif typing.get_origin(base) is list:
        decls = [flag]
        annotation = list[str] | None
        kwargs["help"] = help_text + " (repeat the flag for several values)"
    elif base in (int, float):
        # Taken as text and parsed by the config, so a bad number ("1e30" for a count, "nan")
        # gets the same one-line error, naming the flag, as the same value in YAML.
        decls = [flag]
        annotation = str | None
        kwargs["metavar"] = "INTEGER" if base is int else "NUMBER"
    elif base in (str, Path):
        decls = [flag]
        annotation = base | None
    else:
        decls = [flag]
        annotation = str | None
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, *decls, **kwargs),
        annotation=annotation,
    )


def _help_order(cls: type[StageConfig]) -> list[str]:
    """The command's own fields first (in the order written), then those it shares (engine)."""
    own = set(inspect.get_annotations(cls))
    names = list(cls.model_fields)
    return [n for n in names if n in own] + [n for n in names if n not in own]


def config_command(
    cls: type[StageConfig], run: Callable[[Path | None, bool, dict[str, Any]], None]
) -> Callable[..., None]:
    """A Typer command whose options are `cls`'s fields plus --config and --dry-run."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "--config",
                help=f"YAML file whose `{cls.section}:` section sets defaults; flags win.",
                show_default=False,
            ),
            annotation=Path | None,
        ),
        inspect.Parameter(
            "dry_run",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                False,
                "--dry-run",
                help="Validate flags and config, print the resolved config as YAML, and exit.",
            ),
            annotation=bool,
        ),
    ]
    params += [
        option_parameter(name, cls.model_fields[name])
        for name in _help_order(cls)
        if _is_cli_field(cls.model_fields[name])
    ]

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        dry_run = kwargs.pop("dry_run")
        overrides = {
            k: (v.value if isinstance(v, enum.Enum) else v)
            for k, v in kwargs.items()
            if v is not None and v != []
        }
        run(config_file, dry_run, overrides)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = (cls.__doc__ or "").strip()
    return command
