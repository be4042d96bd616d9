#!/usr/bin/env bash
# Start the treerpo learner on this node: one process, or one per GPU under torchrun/deepspeed.
#
# Environment (no host is hard-coded; every value comes from here or the config):
#   TREERPO_CONFIG   space-separated config files or preset names, merged in order (required)
#   TREERPO_SET      space-separated dotted overrides, e.g. "learner.zero_stage=3 replay.batch_trees=64"
#   NNODES           learner nodes (default 1)
#   NODE_RANK        this node's rank, 0..NNODES-1 (default 0)
#   GPUS_PER_NODE    learner processes on this node (default 1)
#   MASTER_ADDR      rank-0 node address (required when NNODES > 1)
#   MASTER_PORT      rank-0 rendezvous port for the training world (default 29500; not the
#                    weight-sync rendezvous, which is weights.rendezvous_port)
#   TREERPO_LAUNCHER torchrun (default) or deepspeed
#   TREERPO_DRY_RUN  if 1, print the command instead of running it
# Extra arguments are passed to `treerpo learner`.
set -euo pipefail

: "${TREERPO_CONFIG:?set TREERPO_CONFIG to the job config file(s), e.g. /etc/treerpo/config.yaml}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${TREERPO_LAUNCHER:-torchrun}"

for var in NNODES NODE_RANK GPUS_PER_NODE MASTER_PORT; do
  if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
    echo "launch_learner.sh: $var='${!var}' must be a non-negative integer" >&2
    exit 2
  fi
done
if (( NNODES < 1 || GPUS_PER_NODE < 1 )); then
  echo "launch_learner.sh: NNODES and GPUS_PER_NODE must be >= 1" >&2
  exit 2
fi
if (( NODE_RANK >= NNODES )); then
  echo "launch_learner.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
  exit 2
fi

args=(learner)
read -r -a configs <<< "$TREERPO_CONFIG"
for c in "${configs[@]}"; do args+=(--config "$c"); done
read -r -a sets <<< "${TREERPO_SET:-}"
for s in ${sets[@]+"${sets[@]}"}; do args+=(--set "$s"); done
args+=("$@")

if (( NNODES == 1 && GPUS_PER_NODE == 1 )); then
  cmd=(treerpo "${args[@]}")
else
  if (( NNODES > 1 )); then
    : "${MASTER_ADDR:?set MASTER_ADDR to the rank-0 node address when NNODES > 1}"
  else
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
  fi
  case "$LAUNCHER" in
    torchrun)
      cmd=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
           --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --no-python treerpo "${args[@]}") ;;
    deepspeed)
      cmd=(deepspeed --no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK" --num_gpus "$GPUS_PER_NODE"
           --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_python --no_local_rank
           treerpo "${args[@]}") ;;
    *)
      echo "launch_learner.sh: TREERPO_LAUNCHER='$LAUNCHER' must be torchrun or deepspeed" >&2
      exit 2 ;;
  esac
fi

if [[ "${TREERPO_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
