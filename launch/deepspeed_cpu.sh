#!/usr/bin/env bash
# Run `apbv run` with the DeepSpeed launcher on this machine's CPUs (gloo).
#
#   launch/deepspeed_cpu.sh [CONFIG] [key=value ...] [--compare dense]
#
# CONFIG defaults to configs/tiny_cpu.yaml. Environment knobs:
#   NPROC=2              ranks to start (passed as --num_accelerators)
#   APBV_COMMAND=run     the apbv command: run, generate, bench or eval
#   MASTER_PORT=29500    rendezvous port on 127.0.0.1
#   PASS_LOCAL_RANK=0    1: let DeepSpeed append --local_rank=N to the program argv
#   BIND_CORES=0         1: --bind_cores_to_rank (needs `numactl`; sets OMP_NUM_THREADS)
#   OMP_NUM_THREADS      default: cores / NPROC (at least 1)
#   DS_LOG_LEVEL=error   launcher log level (its logs go to stdout; at "warning" every one-node
#                        run logs "Unable to find hostfile", which is expected here)
#   DEEPSPEED            launcher executable (default: .venv/bin/deepspeed)
#   DRY_RUN=1            print the command instead of running it
#
# NPROC must equal the model-parallel product in the config (tiny_cpu.yaml:
# context_parallel_size 2); for 3 ranks also pass parallel.context_parallel_size=3.
#
# Why --num_accelerators: with no GPU, DeepSpeed picks its CPU accelerator whose
# device count is LOCAL_SIZE or the number of NUMA nodes (usually 1), so without
# it only one rank starts, and `--include localhost:0,1` fails with
# "No slot '1' specified on host 'localhost'".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-$(apbv_tool deepspeed)}"

if [[ -z "${OMP_NUM_THREADS:-}" && "${BIND_CORES:-0}" != 1 ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  threads=$(( cores / NPROC ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
export DS_ACCELERATOR=cpu

split_config_args "$@"

cmd=("$DEEPSPEED" --num_accelerators "$NPROC" --master_port "$MASTER_PORT"
     --log_level "${DS_LOG_LEVEL:-error}")
[[ "${PASS_LOCAL_RANK:-0}" == 1 ]] || cmd+=(--no_local_rank)
[[ "${BIND_CORES:-0}" == 1 ]] && cmd+=(--bind_cores_to_rank)
# device=cpu first (later overrides win): DeepSpeed sets CUDA_VISIBLE_DEVICES=0..NPROC-1
# in every rank even on the CPU path, so on a GPU host `device: auto` would pick CUDA.
cmd+=(--module "$APBV_MODULE" "$APBV_COMMAND" "$APBV_CONFIG" device=cpu "${APBV_ARGS[@]}")

run_or_print "${cmd[@]}"
