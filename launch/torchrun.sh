#!/usr/bin/env bash
# Run `apbv run` with torchrun (c10d rendezvous), one node or many.
#
#   launch/torchrun.sh CONFIG [key=value ...] [--compare dense]
#
# One node, 3 CPU ranks:
#   NPROC_PER_NODE=3 launch/torchrun.sh configs/tiny_cpu.yaml parallel.context_parallel_size=3
# Two nodes x 8 GPUs: run on EVERY node with the same endpoint (a host:port on
# node 0 that all nodes can reach):
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node1:29400 launch/torchrun.sh configs/my.yaml
#
# Environment knobs:
#   NNODES=1             --nnodes (also accepts MIN:MAX for elastic ranges)
#   NPROC_PER_NODE=2     --nproc_per_node (GPUs per node on GPU machines)
#   RDZV_ENDPOINT        host:port of the c10d rendezvous (default 127.0.0.1:$MASTER_PORT;
#                        required when NNODES != 1)
#   MASTER_PORT=29500    port used for the default endpoint
#   RDZV_ID=apbv         job id; must be the same on all nodes, unique per job
#   NODE_RANK            optional --node_rank (c10d assigns one otherwise; fix it if
#                        you need a stable host -> rank mapping)
#   OMP_NUM_THREADS      default: cores / NPROC_PER_NODE (at least 1); torchrun would set 1 and
#                        print a banner saying so
#   TORCHRUN             launcher executable (default: .venv/bin/torchrun)
#   DRY_RUN=1            print the command instead of running it
#
# torchrun gives each rank RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
# GROUP_RANK, MASTER_ADDR and MASTER_PORT (an agent-chosen port, not the
# rendezvous port) and OMP_NUM_THREADS (this script's, see above); no extra argv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
TORCHRUN="${TORCHRUN:-$(apbv_tool torchrun)}"
if [[ -z "${OMP_NUM_THREADS:-}" && "$NPROC_PER_NODE" =~ ^[0-9]+$ ]]; then  # not for "auto"/"gpu"
  cores="$(nproc 2>/dev/null || echo 1)"
  threads=$(( cores / NPROC_PER_NODE ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
  if [[ "$NNODES" != 1 ]]; then
    echo "NNODES=$NNODES needs RDZV_ENDPOINT=<node0 host>:<port>" >&2
    exit 2
  fi
  RDZV_ENDPOINT="127.0.0.1:$MASTER_PORT"
fi
split_config_args "$@"

cmd=("$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-apbv}"
     --max_restarts 0)
[[ -n "${NODE_RANK:-}" ]] && cmd+=(--node_rank "$NODE_RANK")
cmd+=(-m "$APBV_MODULE" "$APBV_COMMAND" "$APBV_CONFIG" "${APBV_ARGS[@]}")

run_or_print "${cmd[@]}"
