#!/bin/sh
# The Docker image's entrypoint: writable cache folders for whatever uid the container runs as,
# then `openkd ARGS`.
#
# A bind mount (-v "$PWD/data:/data") replaces the image's /data with the host folder and its
# owner. When this uid cannot write HF_HOME there (or has no writable HOME, as with
# --user UID:GID for a uid the image does not know), caches go under $TMPDIR instead, with one
# line saying so: downloads then last only as long as the container. `--user "$(id -u):$(id -g)"`
# makes the host folder yours and keeps them.
set -eu

writable_dir() {
  mkdir -p "$1" 2>/dev/null && [ -w "$1" ] && [ -x "$1" ]
}

scratch="${TMPDIR:-/tmp}"
wanted="${HF_HOME:-/data/hf-cache}"
if ! writable_dir "$wanted"; then
  HF_HOME="$scratch/hf-cache"
  mkdir -p "$HF_HOME"
  echo "openkd: ${wanted} is not writable by uid $(id -u), so the Hugging Face cache is" \
    "${HF_HOME} for this container only; run with --user \"\$(id -u):\$(id -g)\" to keep" \
    "downloads in the mounted folder" >&2
fi
export HF_HOME
# vLLM, torch and triton cache compiled kernels under HOME (~/.cache, ~/.triton).
if ! writable_dir "${HOME:-/}"; then
  HOME="$scratch/openkd-home"
  mkdir -p "$HOME"
fi
export HOME

exec openkd "$@"
