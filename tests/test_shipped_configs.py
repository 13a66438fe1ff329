"""The accelerate configs openkd ships: each loads, explains itself, and is found by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from openkd.errors import OpenkdError
from openkd.train.launch import (
    DEEPSPEED_CONFIGS,
    SHIPPED_CONFIGS,
    resolve_accelerate_config,
    shipped_configs_dir,
)

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs" / "accelerate"


def test_every_shipped_name_has_a_file_and_nothing_else_is_shipped() -> None:
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_config_loads_and_has_header(name: str) -> None:
    text = (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header_text = "\n".join(header)
    assert len(header) >= 5, f"{name}.yaml needs a comment header"
    for part in ("Purpose:", "Needs:", "Run:"):
        assert part in header_text, f"{name}.yaml header lacks {part}"
    assert "openkd train" in header_text

    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    assert data["compute_environment"] == "LOCAL_MACHINE"
    expected = "DEEPSPEED" if name in DEEPSPEED_CONFIGS else "MULTI_GPU"
    assert data["distributed_type"] == expected
    assert data["use_cpu"] is False
    assert isinstance(data["num_processes"], int) and data["num_processes"] >= 1


@pytest.mark.parametrize("name", ["zero3", "zero3_offload", "multinode_zero3"])
def test_zero3_configs_save_a_loadable_16bit_model(name: str) -> None:
    ds = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())["deepspeed_config"]
    assert ds["zero_stage"] == 3
    # Without it ZeRO-3 writes only DeepSpeed shards: no model.safetensors to load.
    assert ds["zero3_save_16bit_model"] is True


def test_offload_and_multinode_settings() -> None:
    offload = yaml.safe_load((CONFIG_DIR / "zero3_offload.yaml").read_text())["deepspeed_config"]
    assert offload["offload_optimizer_device"] == "cpu"
    assert offload["offload_param_device"] == "cpu"
    multi = yaml.safe_load((CONFIG_DIR / "multinode_zero3.yaml").read_text())
    assert multi["num_machines"] > 1
    assert {"machine_rank", "main_process_ip", "main_process_port"} <= set(multi)


def test_configs_parse_with_accelerate() -> None:
    """accelerate's own loader accepts every shipped file (no unknown or mistyped keys)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for name in SHIPPED_CONFIGS:
        config = load_config_from_file(str(CONFIG_DIR / f"{name}.yaml"))
        assert config.distributed_type.value in ("DEEPSPEED", "MULTI_GPU")


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_resolve_shipped_name(name: str) -> None:
    assert resolve_accelerate_config(name) == (CONFIG_DIR / f"{name}.yaml").resolve()


def test_resolve_path(tmp_path: Path) -> None:
    own = Path(shutil.copy(CONFIG_DIR / "zero2.yaml", tmp_path / "mine.yaml"))
    assert resolve_accelerate_config(str(own)) == own.resolve()


def test_missing_config_lists_shipped_names(tmp_path: Path) -> None:
    with pytest.raises(OpenkdError) as info:
        resolve_accelerate_config(str(tmp_path / "missing.yaml"))
    message = str(info.value)
    assert "\n" not in message
    assert "missing.yaml not found" in message
    assert "zero3, zero3_offload, zero2, ddp, multinode_zero3" in message


def test_not_an_accelerate_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  student: x\n")
    with pytest.raises(OpenkdError, match="not an accelerate config"):
        resolve_accelerate_config(str(bad))
    bad.write_text("a: [unclosed\n")
    with pytest.raises(OpenkdError, match="not readable YAML"):
        resolve_accelerate_config(str(bad))


def test_configs_found_in_checkout_and_in_wheel_layout(tmp_path: Path) -> None:
    # Source checkout: <repo>/openkd and <repo>/configs/accelerate.
    assert shipped_configs_dir() == CONFIG_DIR
    # Installed wheel: pyproject force-includes configs/ as openkd/configs/.
    package = tmp_path / "site-packages" / "openkd"
    shutil.copytree(CONFIG_DIR, package / "configs" / "accelerate")
    assert shipped_configs_dir(package) == package / "configs" / "accelerate"
    with pytest.raises(OpenkdError, match="shipped accelerate configs are missing"):
        shipped_configs_dir(tmp_path / "elsewhere" / "openkd")


def test_wheel_includes_configs() -> None:
    """pyproject.toml force-includes configs/ into the wheel where the lookup expects it."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    force = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force["configs"] == "openkd/configs"


def test_on_policy_recipe_follows_thinking_machines_setup() -> None:
    """SFT start on the teacher's answers, then reverse KL on the student's own samples, the
    teacher wired from generate (same Qwen3 tokenizer), and a cost estimate said to be one."""
    from openkd.pipeline import load_recipe

    recipe = REPO / "configs" / "recipes" / "qwen3-8b_to_qwen3-1.7b-base_on-policy.yaml"
    loaded = load_recipe(recipe)
    assert list(loaded.configs) == ["generate", "train", "on_policy", "eval"]
    gen, sft, op, ev = loaded.configs.values()
    assert sft.loss == "hard" and sft.dataset == str(gen.output)
    assert op.loss == "on-policy" and op.beta == 1.0
    assert op.student == str(sft.output_dir) and op.teacher == gen.teacher == "Qwen/Qwen3-8B"
    assert sft.student.startswith("Qwen/Qwen3-") and op.learning_rate < sft.learning_rate
    assert ev.student == str(op.output_dir)
    header = recipe.read_text().split("\n\n")[0]
    assert "Cost:" in header and "ESTIMATES" in header and "H100" in header
