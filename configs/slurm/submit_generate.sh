#!/bin/bash
# Submit openkd stage 1 as a Slurm array of N shards plus a merge job that starts only when
# every shard succeeded (afterok), from a login node.
#
# Purpose:       the usual way to label a large prompt set: N independent, resumable GPU tasks.
# Prerequisites: sbatch on PATH, configs/slurm/distill.yaml (or CONFIG=...) edited.
# Submit:        bash configs/slurm/submit_generate.sh 8                     (8 shards)
#                TP=2 bash configs/slurm/submit_generate.sh 16 --gpus-per-task=2
#                bash configs/slurm/submit_generate.sh 8 --account=proj --qos=high -p gpu
#                (extra flags go to the array job, and to the merge job too unless they size
#                a task: GPUs, CPUs, memory, time, nodes, tasks, constraints, or set its logs
#                or dependencies; the environment, e.g. TP, CONFIG or SBATCH_PARTITION=gpu,
#                reaches both jobs)
#                CONFIG=my.yaml bash configs/slurm/submit_generate.sh 8      (another config)
# If a task fails, fix the cause, rerun it (scontrol requeue <jobid>_<i>; it resumes its shard),
# then submit the merge again: sbatch --export=ALL,NUM_SHARDS=N configs/slurm/merge.sbatch

set -euo pipefail

cd "$(dirname "$0")/../.."
NUM_SHARDS=${1:-8}
shift $(($# > 0 ? 1 : 0))
if ! [[ "$NUM_SHARDS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: the number of shards must be a positive integer, got '${NUM_SHARDS}'" >&2
  exit 2
fi
mkdir -p logs

# Where the jobs may run and who pays (--account, --qos, --partition, ...) applies to the merge
# job as well, or Slurm may reject it after the array is queued; a generation task's size
# (--gpus-per-task=2, --mem, --time, ...), its logs and dependencies do not: merge.sbatch sets
# its own.
merge_flags=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  flag=${args[i]}
  value=()
  # `-p gpu` / `--qos high`: the next word is the flag's value.
  if [[ "$flag" =~ ^(-[A-Za-z]|--[^=]+)$ ]] && ((i + 1 < ${#args[@]})) && [[ "${args[i + 1]}" != -* ]]; then
    i=$((i + 1))
    value=("${args[i]}")
  fi
  case "$flag" in
    --gpu* | --gres* | --cpu* | --mem* | --time* | --ntasks* | --nodes* | --exclusive* | \
      --constraint* | --array* | --dependency* | --output* | --error* | -[GcntNCadoe]*) ;;
    *) merge_flags+=("$flag" ${value[@]+"${value[@]}"}) ;;
  esac
done

# --parsable prints "jobid[;cluster]"; keep the id.
array_job=$(sbatch --parsable --array=0-$((NUM_SHARDS - 1)) \
  --export=ALL,NUM_SHARDS="$NUM_SHARDS" "$@" configs/slurm/generate_array.sbatch)
array_job=${array_job%%;*}
merge_job=$(sbatch --parsable --dependency=afterok:"$array_job" \
  --export=ALL,NUM_SHARDS="$NUM_SHARDS" ${merge_flags[@]+"${merge_flags[@]}"} configs/slurm/merge.sbatch)
merge_job=${merge_job%%;*}
echo "submitted generation array ${array_job} (${NUM_SHARDS} shards) and merge ${merge_job} (after all succeed)"
