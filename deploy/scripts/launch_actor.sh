#!/usr/bin/env bash
# Start one treerpo actor.
#
# Environment:
#   TREERPO_CONFIG  space-separated config files or preset names, merged in order (required)
#   TREERPO_SET     space-separated dotted overrides, e.g. "transport.learner_host=10.0.0.5"
#   ACTOR_ID        this actor's id (default: the host name; in Kubernetes the pod name)
#   TREERPO_DRY_RUN if 1, print the command instead of running it
# Extra arguments are passed to `treerpo actor`.
set -euo pipefail

: "${TREERPO_CONFIG:?set TREERPO_CONFIG to the job config file(s), e.g. /etc/treerpo/config.yaml}"
ACTOR_ID="${ACTOR_ID:-$(hostname)}"

args=(actor --actor-id "$ACTOR_ID")
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
