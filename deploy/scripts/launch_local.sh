#!/usr/bin/env bash
# Run a whole treerpo job on this machine: one learner, NUM_ACTORS actors and the evaluator, all on loopback,
# optionally with a Prometheus scraping them (WITH_PROMETHEUS=1, deploy/prometheus/prometheus.yml).
# Each process gets its GPUs (CUDA_VISIBLE_DEVICES) and, where vLLM actors share a GPU, its share
# of the memory exactly as `treerpo up` places them (`treerpo up --plan`; design §1.5); a placement
# that cannot fit is refused before anything starts.
# Ctrl-C (or SIGTERM) stops every process this script started, by pid, learner last so it can
# write its final checkpoint.
#
# Environment:
#   TREERPO_CONFIG   config files or preset names (default: the demo preset "demo")
#   TREERPO_SET      extra dotted overrides for every process
#   RUN_DIR          run directory (default runs/local)
#   NUM_ACTORS       actors to start (default 2)
#   METRICS_BASE     learner metrics port; actor i uses METRICS_BASE + 1 + i (default 9400)
#   WITH_PROMETHEUS  1 to also start Prometheus on 127.0.0.1:${PROMETHEUS_PORT:-9090}
#   READY_TIMEOUT_S  seconds to wait for the learner's endpoints.json (default 600)
#   TREERPO_DRY_RUN  if 1, print each process's placement and command instead of starting it
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TREERPO_CONFIG="${TREERPO_CONFIG:-demo}"
RUN_DIR="${RUN_DIR:-runs/local}"
NUM_ACTORS="${NUM_ACTORS:-2}"
METRICS_BASE="${METRICS_BASE:-9400}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"

common_sets="run_dir=$RUN_DIR transport.bind_host=127.0.0.1 transport.learner_host=127.0.0.1 metrics.host=127.0.0.1"

# where each process runs: `treerpo up --plan` prints `NAME [CUDA_VISIBLE_DEVICES=...] [ENV_NAME=VALUE...]
# [dotted.key=VALUE...]` (environment names upper case: a vLLM CPU actor's cores)
plan_args=(up --plan --num-actors "$NUM_ACTORS")
read -r -a configs <<< "$TREERPO_CONFIG"
for c in "${configs[@]}"; do plan_args+=(--config "$c"); done
read -r -a user_sets <<< "${TREERPO_SET:-}"
for s in ${user_sets[@]+"${user_sets[@]}"}; do plan_args+=(--set "$s"); done
plan="$(treerpo "${plan_args[@]}")"  # a placement that cannot fit ends the script here (exit 2)
declare -A gpus=() envs=() sets=()  # NAME -> CUDA_VISIBLE_DEVICES (absent: inherit), its environment, its overrides
while read -r -a words; do
  for w in "${words[@]:1}"; do
    case "$w" in
      CUDA_VISIBLE_DEVICES=*) gpus[${words[0]}]="${w#*=}" ;;
      [A-Z]*=*) envs[${words[0]}]+=" $w" ;;
      *) sets[${words[0]}]+=" $w" ;;
    esac
  done
done <<< "$plan"

# child_env NAME EXTRA_SETS: NAME's launch-script environment, in env_args: its GPUs, its planned
# environment, and the common
# overrides, EXTRA_SETS, the user's TREERPO_SET, then NAME's own (last, so its memory share wins)
child_env() {
  env_args=("TREERPO_CONFIG=$TREERPO_CONFIG" "TREERPO_SET=$common_sets $2 ${TREERPO_SET:-}${sets[$1]:-}")
  if [[ "$1" != learner ]]; then env_args+=("ACTOR_ID=$1"); fi
  if [[ -n "${gpus[$1]+set}" ]]; then env_args+=("CUDA_VISIBLE_DEVICES=${gpus[$1]}"); fi
  local planned
  read -r -a planned <<< "${envs[$1]:-}"
  env_args+=(${planned[@]+"${planned[@]}"})
}
actor_sets() { echo "metrics.actor_port=$((METRICS_BASE + 1 + $1)) actor.seed=$1"; }

if [[ "${TREERPO_DRY_RUN:-0}" == 1 ]]; then  # each process's GPUs and command (the launch scripts print it)
  child_env learner "metrics.learner_port=$METRICS_BASE"
  echo "learner: ${gpus[learner]+CUDA_VISIBLE_DEVICES=${gpus[learner]} }$(env "${env_args[@]}" "$HERE/launch_learner.sh")"
  for (( i=0; i<NUM_ACTORS; i++ )); do
    child_env "actor-$i" "$(actor_sets "$i")"
    echo "actor-$i: ${gpus[actor-$i]+CUDA_VISIBLE_DEVICES=${gpus[actor-$i]} }${envs[actor-$i]:+${envs[actor-$i]# } }$(env "${env_args[@]}" "$HERE/launch_actor.sh")"
  done
  child_env learner ""
  echo "evaluator: ${gpus[learner]+CUDA_VISIBLE_DEVICES=${gpus[learner]} }$(env "${env_args[@]}" "$HERE/launch_evaluator.sh")"
  exit 0
fi

mkdir -p "$RUN_DIR/logs"
pids=()      # learner first, then actors and the evaluator, in start order
prom_pid=""

cleanup() {
  trap - EXIT INT TERM
  # actors first (newest first), then the learner (it checkpoints on SIGTERM), then Prometheus
  for (( i=${#pids[@]}-1; i>=0; i-- )); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  if [[ -n "$prom_pid" ]]; then
    kill -TERM "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

rm -f "$RUN_DIR/endpoints.json"
child_env learner "metrics.learner_port=$METRICS_BASE"
env "${env_args[@]}" "$HERE/launch_learner.sh" >"$RUN_DIR/logs/learner.log" 2>&1 &
learner_pid=$!
pids+=("$learner_pid")
echo "learner pid $learner_pid, log $RUN_DIR/logs/learner.log"

waited=0
until [[ -s "$RUN_DIR/endpoints.json" ]]; do
  if ! kill -0 "$learner_pid" 2>/dev/null; then
    echo "launch_local.sh: the learner exited before writing $RUN_DIR/endpoints.json; see $RUN_DIR/logs/learner.log" >&2
    exit 1
  fi
  if (( waited >= READY_TIMEOUT_S )); then
    echo "launch_local.sh: no $RUN_DIR/endpoints.json after ${READY_TIMEOUT_S}s" >&2
    exit 1
  fi
  sleep 1
  waited=$((waited + 1))
done
echo "learner endpoints: $(cat "$RUN_DIR/endpoints.json")"

for (( i=0; i<NUM_ACTORS; i++ )); do
  child_env "actor-$i" "$(actor_sets "$i")"
  env "${env_args[@]}" "$HERE/launch_actor.sh" >"$RUN_DIR/logs/actor-$i.log" 2>&1 &
  pids+=("$!")
  echo "actor-$i pid $!, log $RUN_DIR/logs/actor-$i.log"
done

# evaluation during training (learner.eval_every): beside the learner, on its GPUs; idle when it is 0
child_env learner ""
env "${env_args[@]}" "$HERE/launch_evaluator.sh" >"$RUN_DIR/logs/evaluator.log" 2>&1 &
pids+=("$!")
echo "evaluator pid $!, log $RUN_DIR/logs/evaluator.log"

if [[ "${WITH_PROMETHEUS:-0}" == 1 ]]; then
  prom_dir="$RUN_DIR/prometheus"
  mkdir -p "$prom_dir"
  targets=""
  for (( i=0; i<NUM_ACTORS; i++ )); do targets+="\"127.0.0.1:$((METRICS_BASE + 1 + i))\","; done
  sed -e "s/\"127.0.0.1:9400\"/\"127.0.0.1:$METRICS_BASE\"/" \
      -e "s/\[\"127.0.0.1:9401\", \"127.0.0.1:9402\"\]/[${targets%,}]/" \
      "$HERE/../prometheus/prometheus.yml" >"$prom_dir/prometheus.yml"
  cp "$HERE/../prometheus/treerpo-rules.yml" "$prom_dir/"
  prometheus --config.file="$prom_dir/prometheus.yml" --storage.tsdb.path="$prom_dir/data" \
    --web.listen-address="127.0.0.1:${PROMETHEUS_PORT:-9090}" >"$RUN_DIR/logs/prometheus.log" 2>&1 &
  prom_pid=$!
  echo "prometheus on http://127.0.0.1:${PROMETHEUS_PORT:-9090}"
fi
wait "$learner_pid"
