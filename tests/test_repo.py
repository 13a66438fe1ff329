"""Repository promises: lint clean, the Dockerfile lints and its install step resolves, YAMLs load."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed; run `just setup`"
    return found


def test_ruff_check_clean():
    proc = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_clean():
    proc = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_clean():
    proc = subprocess.run(
        [_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_docker_install_step_keeps_torch_and_vllm():
    """The Dockerfile's dependency step, resolved against this environment's torch and vLLM."""
    proc = subprocess.run(
        ["bash", "scripts/docker-install.sh", "deps", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch==" in proc.stdout and "held" in proc.stdout


def test_dockerfile_runs_the_checked_install_script():
    text = (ROOT / "Dockerfile").read_text()
    assert "scripts/docker-install.sh deps" in text and "scripts/docker-install.sh app" in text
    assert 'ENTRYPOINT ["openkd"]' in text
    assert "HF_TOKEN=" not in text, "tokens are passed at run time, never baked into the image"


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")), ids=str
)
def test_every_shipped_yaml_has_a_header_and_loads(path):
    text = (ROOT / path).read_text()
    assert text.startswith("#"), f"{path} must start with a comment header (purpose, run command)"
    assert isinstance(yaml.safe_load(text), dict)
