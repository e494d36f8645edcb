#!/usr/bin/env bash
# Run `apbv run` with the DeepSpeed launcher on GPUs (NCCL), one node or many.
#
#   launch/deepspeed_gpu.sh CONFIG [key=value ...] [--compare dense]
#
# One node (no hostfile): all visible GPUs, or GPUS_PER_NODE of them.
#   GPUS_PER_NODE=8 launch/deepspeed_gpu.sh configs/my.yaml
#
# Many nodes, started from node 0 (DeepSpeed reaches the others itself):
#   HOSTFILE=launch/hostfile.example NUM_NODES=2 GPUS_PER_NODE=8 \
#   MASTER_ADDR=node1 DS_LAUNCHER=pdsh launch/deepspeed_gpu.sh configs/my.yaml
#
# Many nodes, started by you (or srun) once per node, no ssh/pdsh needed:
#   HOSTFILE=hosts NODE_RANK=<0..N-1> MASTER_ADDR=node1 launch/deepspeed_gpu.sh ...
#
# Environment knobs:
#   GPUS_PER_NODE        --num_gpus (default: every GPU / every hostfile slot)
#   HOSTFILE             MPI-style hostfile ("node1 slots=8"); unset = this node only
#   NUM_NODES            --num_nodes: use the first N hosts of the hostfile
#   MASTER_ADDR          address of rank 0's node (default: first hostfile host)
#   MASTER_PORT=29500
#   DS_LAUNCHER=pdsh     pdsh | openmpi | mpich | impi | mvapich | slurm
#   DS_LAUNCHER_ARGS     extra arguments for that backend (--launcher_args)
#   NODE_RANK            set => --no_ssh --node_rank NODE_RANK (one launcher per node)
#   PASS_LOCAL_RANK=0    1: let DeepSpeed append --local_rank=N to the program argv
#   DS_LOG_LEVEL=info    launcher log level (its logs go to stdout)
#   DEEPSPEED            launcher executable (default: .venv/bin/deepspeed)
#   DRY_RUN=1            print the command instead of running it
#
# What the program receives:
#   pdsh / --no_ssh / one node: DeepSpeed's per-node launcher starts the ranks
#     with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_SIZE,
#     CROSS_RANK, CROSS_SIZE and CUDA_VISIBLE_DEVICES=<that node's slots>
#     (`python -u -m megatron_apbv run ...`).
#   slurm: `srun -n N --export=ALL,... python -u launch/apbv_entry.py run ...`
#     -- no RANK/MASTER_* from DeepSpeed and --module is ignored, so this
#     script exports MASTER_ADDR/MASTER_PORT and apbv_entry.py maps
#     SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE.
#   openmpi/mpich/impi/mvapich: `mpirun ... python -u launch/apbv_entry.py`,
#     ranks from OMPI_COMM_WORLD_*/PMI_* (mapped by apbv_entry.py); MPICH and
#     Intel MPI get MASTER_*/WORLD_SIZE from DeepSpeed, Open MPI gets them from
#     the `-x` this script adds (MVAPICH: add them via DS_LAUNCHER_ARGS);
#     --num_gpus/--num_nodes are refused by these backends (hostfile slots decide).
# Only variables whose names start with NCCL, PYTHON, UCX, MV2 or MLFLOW are
# forwarded to other nodes by pdsh/mpirun; put others (OMP_NUM_THREADS,
# TORCH_NCCL_*, CUDA_DEVICE_MAX_CONNECTIONS, ...) in ./.deepspeed_env or
# ~/.deepspeed_env as KEY=VALUE lines.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

MASTER_PORT="${MASTER_PORT:-29500}"
DS_LAUNCHER="${DS_LAUNCHER:-pdsh}"
DEEPSPEED="${DEEPSPEED:-$(apbv_tool deepspeed)}"
split_config_args "$@"

cmd=("$DEEPSPEED" --master_port "$MASTER_PORT" --log_level "${DS_LOG_LEVEL:-info}")
mpi_like=0

if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "HOSTFILE=$HOSTFILE not found" >&2; exit 2; }
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")"
  fi
  export MASTER_ADDR MASTER_PORT
  cmd+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
  if [[ -n "${NODE_RANK:-}" ]]; then
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
  else
    launcher_args="${DS_LAUNCHER_ARGS:-}"
    if [[ "${DS_LAUNCHER,,}" == openmpi ]]; then
      # DeepSpeed's Open MPI backend forwards no MASTER_*; mpirun -x does.
      launcher_args="-x MASTER_ADDR=$MASTER_ADDR -x MASTER_PORT=$MASTER_PORT${launcher_args:+ $launcher_args}"
    fi
    cmd+=(--launcher "$DS_LAUNCHER")
    [[ -n "$launcher_args" ]] && cmd+=(--launcher_args "$launcher_args")
    case "${DS_LAUNCHER,,}" in
      pdsh) ;;
      slurm) mpi_like=1; cmd+=(--no_ssh_check) ;;
      openmpi|mpich|impi|mvapich) mpi_like=1 ;;
      *) echo "unknown DS_LAUNCHER=$DS_LAUNCHER" >&2; exit 2 ;;
    esac
  fi
fi

if [[ $mpi_like == 1 && "${DS_LAUNCHER,,}" != slurm ]]; then
  [[ -n "${GPUS_PER_NODE:-}${NUM_NODES:-}" ]] &&
    echo "note: DS_LAUNCHER=$DS_LAUNCHER ignores GPUS_PER_NODE/NUM_NODES; edit the hostfile slots" >&2
else
  [[ -n "${GPUS_PER_NODE:-}" ]] && cmd+=(--num_gpus "$GPUS_PER_NODE")
  [[ -n "${NUM_NODES:-}" ]] && cmd+=(--num_nodes "$NUM_NODES")
fi

if [[ $mpi_like == 1 ]]; then
  # These backends start `python -u <file>` themselves and set no RANK/MASTER_*.
  cmd+=("$LAUNCH_DIR/apbv_entry.py")
else
  [[ "${PASS_LOCAL_RANK:-0}" == 1 ]] || cmd+=(--no_local_rank)
  cmd+=(--module "$APBV_MODULE")
fi
cmd+=("$APBV_COMMAND" "$APBV_CONFIG" "${APBV_ARGS[@]}")

run_or_print "${cmd[@]}"
