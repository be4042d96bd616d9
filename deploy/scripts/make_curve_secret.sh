#!/usr/bin/env bash
# Generate ZeroMQ CURVE key pairs for the learner and the actors and print the Kubernetes Secret
# `treerpo-curve` holding them (learner.key, learner.key_secret, actor.key, actor.key_secret):
#   deploy/scripts/make_curve_secret.sh | kubectl apply -n treerpo -f -
# KEY_DIR (default: a temporary folder, removed afterwards) keeps the generated files.
set -euo pipefail

keep=1
if [[ -z "${KEY_DIR:-}" ]]; then
  KEY_DIR="$(mktemp -d)"
  keep=0
fi
cleanup() { if (( keep == 0 )); then rm -rf "$KEY_DIR"; fi; }
trap cleanup EXIT

python3 - "$KEY_DIR" <<'PY'
import base64, sys
from pathlib import Path
import zmq.auth

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for name in ("learner", "actor"):
    zmq.auth.create_certificates(str(out), name)
print("apiVersion: v1\nkind: Secret\nmetadata:\n  name: treerpo-curve\n  labels:\n    app.kubernetes.io/part-of: treerpo\ntype: Opaque\ndata:")
for name in ("learner.key", "learner.key_secret", "actor.key", "actor.key_secret"):
    print(f"  {name}: {base64.b64encode((out / name).read_bytes()).decode()}")
PY
