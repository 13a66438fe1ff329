"""Config resolution: defaults -> YAML -> flags, unknown keys named, every flag documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from openkd.config import resolve
from openkd.decontaminate.config import DecontaminateConfig
from openkd.errors import ConfigError
from openkd.generate.config import GenerateConfig
from openkd.train.config import TrainConfig
from tests.conftest import run_cli


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_flag_overrides_yaml_and_yaml_overrides_default(tmp_path):
    cfg_file = _yaml(
        tmp_path,
        "generate:\n  teacher: t\n  dataset: d\n  max_new_tokens: 64\n  concurrency: 7\n"
        "train:\n  student: s\n  dataset: d\n",
    )
    cfg = resolve(GenerateConfig, cfg_file, {"max_new_tokens": 128})
    assert cfg.max_new_tokens == 128  # flag wins
    assert cfg.concurrency == 7  # YAML wins over default
    assert cfg.temperature == 0.0  # default: greedy
    train = resolve(TrainConfig, cfg_file, {})
    assert train.student == "s"


def test_dashed_yaml_keys_are_accepted(tmp_path):
    cfg = resolve(
        GenerateConfig,
        _yaml(tmp_path, "generate:\n  teacher: t\n  dataset: d\n  max-new-tokens: 9\n"),
        {},
    )
    assert cfg.max_new_tokens == 9


def test_misspelled_yaml_key_is_named_with_file(tmp_path):
    cfg_file = _yaml(tmp_path, "generate:\n  teacher: t\n  dataset: d\n  max_new_token: 64\n")
    with pytest.raises(ConfigError) as err:
        resolve(GenerateConfig, cfg_file, {})
    msg = str(err.value)
    assert (
        "max_new_token" in msg and str(cfg_file) in msg and "did you mean 'max_new_tokens'" in msg
    )
    assert "\n" not in msg


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'genrate'.*did you mean 'generate'"):
        resolve(GenerateConfig, _yaml(tmp_path, "genrate:\n  teacher: t\n"), {})


def test_missing_required_names_the_flag():
    with pytest.raises(ConfigError, match=r"--teacher is required"):
        resolve(GenerateConfig, None, {"dataset": "d"})


def test_cli_misspelled_key_one_line_nonzero(tmp_path):
    cfg_file = _yaml(tmp_path, "train:\n  student: s\n  dataset: d\n  learning_rte: 0.1\n")
    proc = run_cli("train", "--config", cfg_file, "--dry-run")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "learning_rte" in lines[0] and str(cfg_file) in lines[0]


def test_cli_flag_overrides_yaml_in_dry_run(tmp_path):
    import yaml

    cfg_file = _yaml(
        tmp_path, "generate:\n  teacher: t\n  dataset: d\n  max_new_tokens: 64\n  backend: mock\n"
    )
    proc = run_cli("generate", "--config", cfg_file, "--max-new-tokens", "5", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)["generate"]
    assert resolved["max_new_tokens"] == 5
    assert resolved["backend"] == "mock"
    assert resolved["temperature"] == 0.0


def test_top_level_help_lists_stages():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "generate" in proc.stdout and "train" in proc.stdout


@pytest.mark.parametrize(
    "stage,cls",
    [("generate", GenerateConfig), ("train", TrainConfig), ("decontaminate", DecontaminateConfig)],
)
def test_every_cli_field_is_documented_in_help(stage, cls):
    proc = run_cli(stage, "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("cli") is False:
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in proc.stdout, f"{flag} missing from `openkd {stage} --help`"
        assert info.description, f"{name} has no description"


def test_version():
    from openkd import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout
