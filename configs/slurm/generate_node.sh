#!/bin/bash
# One node's part of generate_nodes.sbatch: label shard SLURM_NODEID of SLURM_NNODES with a vLLM
# OpenAI-compatible server that uses every GPU of this node (TP x DP).
#
# Purpose:       the per-node step that srun starts on each node; see generate_nodes.sbatch.
# Prerequisites: a Slurm step environment (SLURM_NODEID, SLURM_NNODES, SLURM_GPUS_ON_NODE) and
#                CONFIG, SERVER, TP, DP, PORT, OUTPUT, VLLM_ARGS as exported by the batch script.
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

# SERVER=vllm: start the server here with the engine settings the config resolves to, the same
# ones `--backend vllm` and `--serve` use, so server and client agree on model and context.
settings=$(openkd generate --config "$CONFIG" --dry-run | python -c '
import shlex, sys, yaml
cfg = yaml.safe_load(sys.stdin)["generate"]
from openkd.generate.vllm.engine import as_cli_flags
for key in ("teacher", "dtype", "gpu_memory_utilization", "seed", "max_model_len", "max_num_seqs",
            "revision", "enforce_eager", "trust_remote_code"):
    value = cfg[key]
    value = ("1" if value else "") if isinstance(value, bool) else "" if value is None else str(value)
    print(f"{key.upper()}={shlex.quote(value)}")
engine = as_cli_flags(cfg.get("vllm_args") or {})  # vllm_args, as --serve passes them
print("ENGINE_ARGS=(" + shlex.join(engine) + ")")
')
eval "$settings"
LOG=logs/vllm-server-${SLURM_JOB_ID:-local}-$(hostname).log

# The server keeps vLLM's default --generation-config auto: like every openkd backend it then
# applies the teacher's generation_config.json defaults (e.g. Qwen's repetition_penalty).
python -m vllm.entrypoints.openai.api_server \
  --model "$TEACHER" --served-model-name "$TEACHER" \
  --host 0.0.0.0 --port "$PORT" \
  --tensor-parallel-size "$TP" --data-parallel-size "$DP" \
  --dtype "$DTYPE" --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" --seed "$SEED" \
  ${MAX_MODEL_LEN:+--max-model-len "$MAX_MODEL_LEN"} \
  ${MAX_NUM_SEQS:+--max-num-seqs "$MAX_NUM_SEQS"} \
  ${REVISION:+--revision "$REVISION"} \
  ${ENFORCE_EAGER:+--enforce-eager} \
  ${TRUST_REMOTE_CODE:+--trust-remote-code} \
  "${ENGINE_ARGS[@]}" ${VLLM_ARGS:-} >"$LOG" 2>&1 &
server_pid=$!
stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
trap stop_server EXIT

echo "waiting for the vLLM server on $(hostname):${PORT} (log: ${LOG})" >&2
deadline=$((SECONDS + ${SERVE_TIMEOUT:-1800}))
until curl -sf "http://127.0.0.1:${PORT}/health" >/dev/null; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "error: the vLLM server on $(hostname) exited while starting; last lines of ${LOG}:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "error: the vLLM server on $(hostname) was not healthy after ${SERVE_TIMEOUT:-1800} s;" \
      "see ${LOG} or raise SERVE_TIMEOUT" >&2
    exit 1
  fi
  sleep 5
done

openkd generate --config "$CONFIG" --backend openai \
  --base-url "http://$(hostname):${PORT}/v1" \
  --shard "$SHARD" ${OUTPUT:+--output "$OUTPUT"}
