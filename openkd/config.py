"""Typed stage configs and the one function that resolves them: defaults -> YAML -> flags.

A field's name is its YAML key (`max_new_tokens`, `max-new-tokens` also accepted) and its flag
(`--max-new-tokens`); its description is its `--help` text. One YAML file may hold a
`generate:`, a `train:`, an `eval:` and a `decontaminate:` section; each command reads its own.
"""

from __future__ import annotations

import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

from openkd.errors import ConfigError

SECTIONS = (
    "generate",
    "train",
    "on_policy",  # `openkd run`'s second training stage (`openkd train` keys, --loss on-policy)
    "eval",
    "decontaminate",
    "export",
    "plan",
    "plan_fit",
    "plan_pilot",
)

C = TypeVar("C", bound="StageConfig")
# Every stage config class by section, for naming the section a misplaced YAML key belongs in.
SECTION_CLASSES: dict[str, type[StageConfig]] = {}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Upper bound of every token count (answer, context, example length): beyond any model's context,
# and low enough that nothing sized by it (TRL's packing tree) allocates without limit.
MAX_TOKENS = 2**24
# Upper bound of waits in seconds: longer ones overflow the timeouts of threads and sockets.
MAX_SECONDS = 7 * 24 * 3600.0


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=False
    )
    section: ClassVar[str]
    # Keys of earlier versions that are gone, with what to do instead.
    removed: ClassVar[dict[str, str]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "section" in cls.__dict__:
            SECTION_CLASSES[cls.section] = cls

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        """NaN and infinities are refused by name, from flags ("nan") and YAML (.nan) alike: a
        bound such as >= 0 would call NaN negative, and an accepted inf would be written to the
        metadata as `Infinity`, which is not JSON."""
        if info.field_name and numeric_fields(cls).get(info.field_name) and _non_finite(value):
            raise ValueError(f"{str(value).strip()} is not a finite number")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: Any, info: ValidationInfo) -> Any:
        """Integers must fit 64 bits: seeds, sizes and counts end up in numpy, torch and vLLM."""
        if (
            info.field_name
            and numeric_fields(cls).get(info.field_name) is int
            and isinstance(value, int)
            and not INT64_MIN <= value <= INT64_MAX
        ):
            raise ValueError(f"{value} does not fit a 64-bit integer")
        return value

    def chosen(self, name: str) -> bool:
        """True when `name` was given (flag or YAML) with a value other than its default. A
        default written out, as in the resolved config saved beside every output, is no choice."""
        info = type(self).model_fields[name]
        default = info.get_default(call_default_factory=True)
        return name in self.model_fields_set and getattr(self, name) != default

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data, saved beside every output."""
        return self.model_dump(mode="json")


@functools.cache
def numeric_fields(cls: type[BaseModel]) -> dict[str, type]:
    """`{field: int or float}` for every numeric field of `cls`, optional ones included."""
    out: dict[str, type] = {}
    for name, info in cls.model_fields.items():
        kind = numeric_type(info)
        if kind is not None:
            out[name] = kind
    return out


def numeric_type(info: FieldInfo) -> type | None:
    """int or float when the field holds a number (`int | None` included), else None."""
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    if annotation is int:
        return int
    return float if annotation is float else None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        try:
            return not math.isfinite(float(value))
        except ValueError:
            return False
    return False


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def cli_only(**extra: Any) -> dict[str, Any]:
    """json_schema_extra marker for fields that exist only in YAML (dicts, nested settings)."""
    return {"cli": False, **extra}


def _normalise_keys(data: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_config_file(path: Path, given_as: str = "--config") -> dict[str, Any]:
    """The sections of a YAML config file: it must be a file, valid YAML, known section names.
    `given_as` names how the user gave the path (a flag, or `openkd run`'s recipe argument)."""
    if path.is_dir():
        raise ConfigError(f"{given_as} {path} is a directory; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"{given_as} {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax and rerun") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            hint = did_you_mean(str(key), SECTIONS)
            raise ConfigError(
                f"{path}: unknown section '{key}'{hint}; valid sections are {', '.join(SECTIONS)}"
            )
    return data


def read_section(
    path: Path,
    section: str,
    valid_keys: set[str],
    removed: dict[str, str] | None = None,
    given_as: str = "--config",
) -> dict[str, Any]:
    """Read one section of a YAML config file, rejecting unknown sections and keys by name."""
    return section_values(read_config_file(path, given_as), path, section, valid_keys, removed)


def section_values(
    data: dict[str, Any],
    path: Path,
    section: str,
    valid_keys: set[str],
    removed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`section`'s keys from a config file's `data`; a key of this command put in another
    section (an indentation slip) is named too, since this command would silently miss it."""
    body = _section_body(data, path, section)
    for key in body:
        if key in (removed or {}):
            raise ConfigError(
                f"{path}: key '{key}' in section '{section}' is no longer used: "
                f"{(removed or {})[key]}; delete it"
            )
        if key not in valid_keys:
            homes = [
                s for s, cls in SECTION_CLASSES.items() if s != section and key in cls.model_fields
            ]
            if homes:
                raise ConfigError(_misplaced(path, [key], section, homes))
            hint = did_you_mean(key, valid_keys)
            raise ConfigError(
                f"{path}: unknown key '{key}' in section '{section}'{hint}; "
                f"see `openkd {section.replace('_', ' ')} --help` for valid keys"
            )
    for other, cls in SECTION_CLASSES.items():
        if other == section or not isinstance(data.get(other), dict):
            continue
        keys = [
            key
            for key in _section_body(data, path, other)
            if key in valid_keys and key not in cls.model_fields and key not in cls.removed
        ]
        if keys:
            raise ConfigError(_misplaced(path, keys, other, [section]))
    return body


def _section_body(data: dict[str, Any], path: Path, section: str) -> dict[str, Any]:
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping of key: value")
    return _normalise_keys(body)


def _misplaced(path: Path, keys: list[str], section: str, homes: list[str]) -> str:
    where = " or ".join(f"'{home}:'" for home in homes)
    what = f"key '{keys[0]}'" if len(keys) == 1 else "keys " + ", ".join(f"'{k}'" for k in keys)
    belong = "belongs" if len(keys) == 1 else "belong"
    return (
        f"{path}: {what} in section '{section}' {belong} in {where}; move "
        f"{'it' if len(keys) == 1 else 'them'} there (see `openkd {section.replace('_', ' ')} --help` for the keys "
        f"of '{section}:')"
    )


def did_you_mean(word: str, options: Any, cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for the closest of `options`, or an empty string."""
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve(cls: type[C], config_file: Path | None, overrides: dict[str, Any]) -> C:
    """Build a config: field defaults, then the YAML section, then flags the user actually passed."""
    values: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if config_file is not None:
        data = read_config_file(Path(config_file))
        values.update(
            section_values(data, Path(config_file), cls.section, set(cls.model_fields), cls.removed)
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return validate(cls, values, source=config_file)
    except ConfigError as exc:
        missing = [n for n, f in cls.model_fields.items() if f.is_required() and n not in values]
        if config_file is None or not missing or cls.section in data:
            raise
        has = f"its sections: {', '.join(data)}" if data else "it is empty"
        raise ConfigError(
            f"{exc}; {config_file} has no `{cls.section}:` section ({has}), so none of its "
            f"settings apply to `openkd {cls.section.replace('_', ' ')}`"
        ) from exc


def validate(cls: type[C], values: dict[str, Any], source: Path | None = None) -> C:
    """Validate all values at once and report every problem on one line, named by flag."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc


def describe_validation_error(exc: ValidationError, source: Path | None = None) -> str:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        field = loc[0] if loc else ""
        if err["type"] == "missing":
            where = f" or `{field}:` in the config file" if source else ""
            problems.append(f"{flag_name(field)} is required (pass {flag_name(field)}{where})")
        elif field:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{flag_name(field)}: {msg}")
        else:
            problems.append(err["msg"].removeprefix("Value error, "))
    return "; ".join(problems)


def save_resolved(config: StageConfig, path: Path) -> None:
    """Write the resolved config beside an output so a run can be reproduced and compared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        yaml.safe_dump({config.section: config.to_yaml_dict()}, sort_keys=False), encoding="utf-8"
    )
    tmp.replace(path)
