#!/usr/bin/env bash
# Start the evaluator beside the learner: evaluation during training (learner.eval_every; design §8.5).
# It scores the weights the learner exports under RUN_DIR/evals/ on the held-out set and appends the
# results to RUN_DIR/evals.jsonl, which the learner reads back into Prometheus and the trackers; it
# must see the learner's run directory. With learner.eval_every = 0 it idles until stopped.
#
# Environment:
#   TREERPO_CONFIG  space-separated config files or preset names, merged in order (required)
#   TREERPO_SET     space-separated dotted overrides
#   TREERPO_DRY_RUN if 1, print the command instead of running it
# Extra arguments are passed to `treerpo evaluator`.
set -euo pipefail

: "${TREERPO_CONFIG:?set TREERPO_CONFIG to the job config file(s), e.g. /etc/treerpo/config.yaml}"

args=(evaluator)
read -r -a configs <<< "$TREERPO_CONFIG"
for c in "${configs[@]}"; do args+=(--config "$c"); done
read -r -a sets <<< "${TREERPO_SET:-}"
for s in ${sets[@]+"${sets[@]}"}; do args+=(--set "$s"); done
args+=("$@")

if [[ "${TREERPO_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' treerpo "${args[@]}"
  echo
  exit 0
fi
exec treerpo "${args[@]}"
