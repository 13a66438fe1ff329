"""Typed stage configs and the one function that resolves them: defaults -> YAML -> flags.

A field's name is its YAML key (`max_new_tokens`, `max-new-tokens` also accepted) and its flag
(`--max-new-tokens`); its description is its `--help` text. One YAML file may hold a
`generate:`, a `train:`, an `eval:` and a `decontaminate:` section; each command reads its own.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from openkd.errors import ConfigError

SECTIONS = ("generate", "train", "eval", "decontaminate")

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=False
    )
    section: ClassVar[str]
    # Keys of earlier versions that are gone, with what to do instead.
    removed: ClassVar[dict[str, str]] = {}

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data, saved beside every output."""
        return self.model_dump(mode="json")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def cli_only(**extra: Any) -> dict[str, Any]:
    """json_schema_extra marker for fields that exist only in YAML (dicts, nested settings)."""
    return {"cli": False, **extra}


def _normalise_keys(data: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_section(
    path: Path, section: str, valid_keys: set[str], removed: dict[str, str] | None = None
) -> dict[str, Any]:
    """Read one section of a YAML config file, rejecting unknown sections and keys by name."""
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass an existing YAML file to --config"
        )
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
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping of key: value")
    body = _normalise_keys(body)
    for key in body:
        if key in (removed or {}):
            raise ConfigError(
                f"{path}: key '{key}' in section '{section}' is no longer used: "
                f"{(removed or {})[key]}; delete it"
            )
        if key not in valid_keys:
            hint = did_you_mean(key, valid_keys)
            raise ConfigError(
                f"{path}: unknown key '{key}' in section '{section}'{hint}; "
                f"see `openkd {section} --help` for valid keys"
            )
    return body


def did_you_mean(word: str, options: Any, cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for the closest of `options`, or an empty string."""
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve(cls: type[C], config_file: Path | None, overrides: dict[str, Any]) -> C:
    """Build a config: field defaults, then the YAML section, then flags the user actually passed."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(
            read_section(Path(config_file), cls.section, set(cls.model_fields), cls.removed)
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(cls, values, source=config_file)


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
