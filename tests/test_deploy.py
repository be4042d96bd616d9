"""deploy/: kustomize renders, strict schema validation, manifests agree with the config model and
common/metrics.py, promtool checks and unit tests, launch scripts, and a real Prometheus running
every dashboard query against real MetricsServers.

Tools: kubectl (kustomize), kubernetes-validate, promtool/prometheus (Debian `prometheus`),
shellcheck (Debian `shellcheck`). A test needing one skips when it is missing, except under
CI=true, where it fails.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from common.config import apply_overrides, build_config, deep_merge
from common.metrics import (
    ActorMetrics,
    LearnerMetrics,
    MetricsServer,
    WeightSyncMetrics,
    exported_names,
    new_registry,
)
from tests.prom_stack import PromStack, promql_metric_names

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["base", "overlays/single-node", "overlays/multi-node"]
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
RULES = DEPLOY / "prometheus" / "treerpo-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "treerpo.json"
PROMETHEUS_SERIES = {"up"}  # made by Prometheus itself, not by treerpo
SCRIPTS = sorted((DEPLOY / "scripts").glob("*.sh"))


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is required in CI (apt-get install prometheus shellcheck; kubectl)")
        pytest.skip(f"{binary} not installed")
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _render(overlay: str) -> tuple[dict, ...]:
    kubectl = require("kubectl")
    out = run([kubectl, "kustomize", str(K8S / overlay)])
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(overlay: str) -> list[dict]:
    return [json.loads(json.dumps(d)) for d in _render(overlay)]  # a fresh copy per caller


def one(docs: list[dict], kind: str, prefix: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"expected one {kind} {prefix}*, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def ports_of(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def job_config(docs: list[dict]):
    """The JobConfig every process loads: config.yaml then overlay.yaml, then TREERPO_SET."""
    cm = one(docs, "ConfigMap", "treerpo-config")
    data = {}
    for key in ("config.yaml", "overlay.yaml"):
        data = deep_merge(data, yaml.safe_load(cm["data"][key]) or {})
    return data, build_config(data)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders(overlay):
    kinds = {d["kind"] for d in render(overlay)}
    assert {"ConfigMap", "Secret", "Service", "Job", "StatefulSet", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    if overlay != "base":
        assert {"Namespace", "PodMonitor", "PrometheusRule"} <= kinds
        assert all(d["metadata"].get("namespace") == "treerpo" for d in render(overlay) if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_strict_schema_validation(overlay, tmp_path):
    validator = require("kubernetes-validate")
    builtin = [d for d in render(overlay) if d["kind"] not in CRD_KINDS]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    out = run([validator, "--strict", "--quiet", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_strict_validation_catches_a_misspelt_field(tmp_path):
    # The validator itself must be able to fail: a typo in a container field is rejected.
    validator = require("kubernetes-validate")
    job = one(render("base"), "Job", "treerpo-learner")
    container(job)["imagePullPolicyy"] = "Always"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    assert run([validator, "--strict", "--quiet", str(path)]).returncode != 0


# --------------------------------------------------------------------------------------------
# Manifests against the config model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_is_a_valid_job_config(overlay):
    docs = render(overlay)
    data, cfg = job_config(docs)
    assert cfg.data.prompt_template.format(problem="P").startswith("P")  # a usable format string
    learner, actors = one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")
    # TREERPO_SET overrides, if any, must be valid too
    sets = env_of(container(learner))["TREERPO_SET"].get("value", "").split()
    build_config(apply_overrides(data, sets))
    # the files the processes are told to load are the ConfigMap's keys, at its mount
    cm = one(docs, "ConfigMap", "treerpo-config")
    for workload in (learner, actors):
        c = container(workload)
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
        vol = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
        assert vol["configMap"]["name"] == cm["metadata"]["name"]
        args = c.get("args", []) + c.get("command", [])
        files = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
        files += env_of(c).get("TREERPO_CONFIG", {}).get("value", "").split()
        assert files == [f"{mount}/config.yaml", f"{mount}/overlay.yaml"], files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_endpoints_match_the_config(overlay):
    docs = render(overlay)
    _, cfg = job_config(docs)
    job, actors = one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")
    lc, ac = container(job), container(actors)
    expected = {"data": cfg.transport.data_port, "control": cfg.transport.control_port,
                "rendezvous": cfg.weights.rendezvous_port, "metrics": cfg.metrics.learner_port}
    lp = ports_of(lc)
    assert {k: lp[k] for k in expected} == expected
    assert ports_of(ac) == {"metrics": cfg.metrics.actor_port}
    env = env_of(lc)
    assert int(env["MASTER_PORT"]["value"]) == lp["dist"]
    assert len(set(lp.values())) == len(lp)  # no port used twice
    # Services expose the same named ports
    svc = one(docs, "Service", "treerpo-learner")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == lp
    assert all(p["targetPort"] == p["name"] for p in svc["spec"]["ports"])
    asvc = one(docs, "Service", "treerpo-actor")
    assert {p["name"]: p["port"] for p in asvc["spec"]["ports"]} == ports_of(ac)
    # processes bind every interface in a pod; non-loopback binds need CURVE (or an explicit insecure)
    assert cfg.transport.bind_host == "0.0.0.0" and cfg.metrics.host == "0.0.0.0"
    assert cfg.transport.curve and not cfg.transport.insecure
    # actors and learner ranks reach rank 0 through the headless Service's stable DNS name
    rank0 = f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert cfg.transport.learner_host == rank0 == env["MASTER_ADDR"]["value"]
    # probes hit /health and /ready on the metrics port (multi-node: an exec probe, see below)
    for c, port in ((lc, cfg.metrics.learner_port), (ac, cfg.metrics.actor_port)):
        for probe, path in (("livenessProbe", "/health"), ("startupProbe", "/health"), ("readinessProbe", "/ready")):
            if "httpGet" in c[probe]:
                assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}
            else:
                assert c is lc and int(env["NNODES"]["value"]) > 1
                assert f"http://127.0.0.1:{port}{path}" in c[probe]["exec"]["command"][-1]


def test_multi_node_exec_probes_check_node_zero_only():
    # Run the overlay's probe command for real against a MetricsServer (its port swapped in).
    import sys

    job = one(render("overlays/multi-node"), "Job", "treerpo-learner")
    c = container(job)
    with MetricsServer("127.0.0.1", 0, new_registry(process_metrics=False)) as server:
        for probe, ready, node_rank, ok in (("livenessProbe", False, "0", True), ("readinessProbe", False, "0", False),
                                            ("readinessProbe", True, "0", True), ("readinessProbe", False, "1", True)):
            server.set_ready(ready)
            cmd = [sys.executable if a == "python3" else a.replace(":9400/", f":{server.port}/")
                   for a in c[probe]["exec"]["command"]]
            out = run(cmd, env={**os.environ, "NODE_RANK": node_rank})
            assert (out.returncode == 0) == ok, (probe, ready, node_rank, out.stderr)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_match_the_topology(overlay):
    docs = render(overlay)
    _, cfg = job_config(docs)
    job, actors = one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")
    lc, ac = container(job), container(actors)
    env = env_of(lc)
    nnodes = int(env["NNODES"]["value"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert int(env["GPUS_PER_NODE"]["value"]) == int(lc["resources"]["limits"]["nvidia.com/gpu"])
    assert int(ac["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert actors["spec"]["replicas"] == cfg.actor.num_actors
    # the actor id is the pod name, substituted from the env by Kubernetes
    args = ac["args"]
    assert args[0] == "actor" and args[args.index("--actor-id") + 1] == "$(POD_NAME)"
    assert env_of(ac)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for c in (lc, ac):  # every $(VAR) used in command/args is defined
        for ref in re.findall(r"\$\((\w+)\)", " ".join(c.get("command", []) + c.get("args", []))):
            assert ref in env_of(c), f"{c['name']} uses $({ref}) without defining it"
    # multi-node checkpoints need storage every node can write
    pvc = one(docs, "PersistentVolumeClaim", "treerpo-run")
    assert pvc["spec"]["accessModes"] == (["ReadWriteMany"] if nnodes > 1 else ["ReadWriteOnce"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_shm_security_and_termination(overlay):
    docs = render(overlay)
    _, cfg = job_config(docs)
    job, actors = one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")
    for workload in (job, actors):
        spec = workload["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(workload)["volumeMounts"]}
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        assert mounts[cfg.transport.curve_dir] == "curve"
    lspec = job["spec"]["template"]["spec"]
    assert lspec["terminationGracePeriodSeconds"] >= 300  # the final checkpoint of a large model
    lmounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    lvols = {v["name"]: v for v in lspec["volumes"]}
    run_mount = next(p for p in lmounts if cfg.run_dir.startswith(p + "/"))
    assert lvols[lmounts[run_mount]]["persistentVolumeClaim"]["claimName"] == "treerpo-run"
    amounts = {m["mountPath"]: m["name"] for m in container(actors)["volumeMounts"]}
    for path in cfg.data.paths:
        assert any(path.startswith(p + "/") for p in amounts), f"data path {path} is on no actor volume"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_curve_secret_layout_matches_transport(overlay):
    # common/transport.py: the learner reads learner.key_secret and the allow-list actors/*.key;
    # an actor reads learner.key and private/<curve_key_name>.key_secret.
    docs = render(overlay)
    _, cfg = job_config(docs)
    name = cfg.transport.curve_key_name

    def paths(workload: dict) -> set[str]:
        vol = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "curve")
        assert vol["secret"]["secretName"] == "treerpo-curve"
        return {i["path"] for i in vol["secret"]["items"]}

    assert {"learner.key_secret", f"actors/{name}.key"} <= paths(one(docs, "Job", "treerpo-learner"))
    actor_paths = paths(one(docs, "StatefulSet", "treerpo-actor"))
    assert {"learner.key", f"private/{name}.key_secret"} <= actor_paths
    assert "learner.key_secret" not in actor_paths  # actors never hold the learner's secret


def test_make_curve_secret_provides_every_mounted_key():
    pytest.importorskip("zmq")
    out = run(["bash", str(DEPLOY / "scripts" / "make_curve_secret.sh")])
    assert out.returncode == 0, out.stderr
    secret = yaml.safe_load(out.stdout)
    docs = render("base")
    wanted = set()
    for workload in (one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")):
        vol = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "curve")
        wanted |= {i["key"] for i in vol["secret"]["items"]}
    assert secret["metadata"]["name"] == "treerpo-curve" and wanted <= set(secret["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay):
    docs = render(overlay)
    job, actors = one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")
    labels = {"learner": job["spec"]["template"]["metadata"]["labels"],
              "actor": actors["spec"]["template"]["metadata"]["labels"]}
    named = {"learner": set(ports_of(container(job))), "actor": set(ports_of(container(actors)))}

    def selects(selector: dict, pod_labels: dict) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    for role in ("learner", "actor"):
        policy = one(docs, "NetworkPolicy", f"treerpo-{role}")
        assert selects(policy["spec"]["podSelector"], labels[role])
        assert not selects(policy["spec"]["podSelector"], labels["actor" if role == "learner" else "learner"])
        reach: dict[str, set[str]] = {}  # named port -> which peers may reach it
        for rule in policy["spec"]["ingress"]:
            peers = set()
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    peers.add("prometheus")
                elif selects(peer["podSelector"], labels["actor"]):
                    peers.add("actor")
                elif selects(peer["podSelector"], labels["learner"]):
                    peers.add("learner")
                else:
                    raise AssertionError(f"unexpected peer {peer}")
            ports = rule.get("ports")
            if ports is None:  # all ports: allowed only between learner ranks
                assert peers == {"learner"} and role == "learner"
                continue
            for p in ports:
                if isinstance(p["port"], str):
                    assert p["port"] in named[role], f"{p['port']} is not a {role} container port"
                    reach.setdefault(p["port"], set()).update(peers)
                else:  # the collectives' ephemeral range, only between learner and actors
                    assert p["port"] >= 32768 and p.get("endPort") == 60999
                    assert peers <= {"learner", "actor"}
        assert reach.pop("metrics") == {"prometheus"}
        if role == "learner":
            assert reach == {"data": {"actor"}, "control": {"actor"}, "rendezvous": {"actor"}}
        else:
            assert reach == {}


@pytest.mark.parametrize("overlay", OVERLAYS[1:])
def test_monitoring_component(overlay):
    docs = render(overlay)
    pm = one(docs, "PodMonitor", "treerpo")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    for workload in (one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")):
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
        assert "metrics" in ports_of(container(workload))
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    keep = next(r for r in endpoint["relabelings"] if r.get("action") == "keep")
    assert keep["regex"] == "actor;.*|learner;0"  # learner nodes > 0 serve no metrics
    job_relabel = next(r for r in endpoint["relabelings"] if r.get("targetLabel") == "job")
    assert job_relabel["replacement"] == "treerpo-$1"  # -> treerpo-learner / treerpo-actor, as in the rules
    rule = one(docs, "PrometheusRule", "treerpo")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    dash = one(docs, "ConfigMap", "treerpo-grafana-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["treerpo.json"]) == json.loads(DASHBOARD.read_text())


def test_generated_files_are_up_to_date():
    import importlib.util

    for path, target in ((DEPLOY / "grafana" / "build_dashboard.py", DASHBOARD),
                         (DEPLOY / "prometheus" / "build_prometheusrule.py",
                          K8S / "components" / "monitoring" / "prometheusrule.yaml")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.render() == target.read_text(), f"{target} is stale: run python {path.relative_to(REPO)}"


# --------------------------------------------------------------------------------------------
# Dashboard and rules against common/metrics.py
# --------------------------------------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str, str]]:
    """(row title, panel title, expr) of every query in the dashboard."""
    out, row = [], ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        out += [(row, panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def is_vllm(expr: str) -> bool:
    return "vllm:" in expr


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    (var,) = dash["templating"]["list"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Training progress", "Async health", "Throughput", "Weight sync", "Actors", "vLLM engine"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    # vLLM queries live in the vLLM row only
    assert all((row == "vLLM engine") == is_vllm(expr) for row, _, expr in dashboard_queries())


def test_every_metric_in_dashboard_and_rules_is_declared():
    declared = exported_names()
    used = set()
    for _, _, expr in dashboard_queries():
        used |= {n for n in promql_metric_names(expr) if not n.startswith("vllm:")}
    for expr in rule_exprs():
        used |= promql_metric_names(expr)
    assert used - PROMETHEUS_SERIES, "no names extracted"
    undeclared = used - declared - PROMETHEUS_SERIES
    assert not undeclared, f"used but not declared in common/metrics.py: {sorted(undeclared)}"
    # the extractor finds what a reader sees (a check on the helper itself)
    assert promql_metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y"}[5m]))) / b') == {"a_bucket", "b"}


def test_promtool_check_and_test_rules():
    promtool = require("promtool")
    out = run([promtool, "check", "rules", str(RULES)])
    assert out.returncode == 0, out.stdout + out.stderr
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.yaml"))
    assert tests
    out = run([promtool, "test", "rules", *map(str, tests)])
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_promtool_test():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = set()
    for path in (DEPLOY / "prometheus" / "tests").glob("*.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts - tested == set()


# --------------------------------------------------------------------------------------------
# Scripts and image
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_shellcheck(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)
    out = run(["bash", "-n", str(script)])
    assert out.returncode == 0, out.stderr
    shellcheck = require("shellcheck")
    out = run([shellcheck, "-S", "style", str(script)])
    assert out.returncode == 0, out.stdout


def launch(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "TREERPO_DRY_RUN": "1", **env}
    return run(["bash", str(DEPLOY / "scripts" / script), *args], env=full)


def test_launch_learner_commands():
    base = {"TREERPO_CONFIG": "/etc/treerpo/config.yaml /etc/treerpo/overlay.yaml", "TREERPO_SET": "tree.depth=1 tree.branching=[8]"}
    single = launch("launch_learner.sh", base, "--extra")
    assert single.returncode == 0, single.stderr
    assert single.stdout.split() == ["treerpo", "learner", "--config", "/etc/treerpo/config.yaml", "--config",
                                     "/etc/treerpo/overlay.yaml", "--set", "tree.depth=1", "--set",
                                     "tree.branching=\\[8\\]", "--extra"]
    multi = launch("launch_learner.sh", {**base, "NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "8",
                                         "MASTER_ADDR": "treerpo-learner-0.treerpo-learner", "MASTER_PORT": "29500"})
    assert multi.returncode == 0, multi.stderr
    words = multi.stdout.split()
    assert words[:words.index("treerpo")] == [
        "torchrun", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8", "--master-addr",
        "treerpo-learner-0.treerpo-learner", "--master-port", "29500", "--no-python"]
    assert words[words.index("treerpo"):][:2] == ["treerpo", "learner"]
    ds = launch("launch_learner.sh", {**base, "GPUS_PER_NODE": "4", "TREERPO_LAUNCHER": "deepspeed"})
    assert ds.returncode == 0 and ds.stdout.split()[:2] == ["deepspeed", "--no_ssh"] and "--num_gpus" in ds.stdout
    # refused configurations say what is wrong
    no_addr = launch("launch_learner.sh", {**base, "NNODES": "2"})
    assert no_addr.returncode != 0 and "MASTER_ADDR" in no_addr.stderr
    bad_rank = launch("launch_learner.sh", {**base, "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"})
    assert bad_rank.returncode == 2 and "NODE_RANK" in bad_rank.stderr
    assert "TREERPO_CONFIG" in launch("launch_learner.sh", {}).stderr


def test_launch_actor_command():
    out = launch("launch_actor.sh", {"TREERPO_CONFIG": "a.yaml", "ACTOR_ID": "treerpo-actor-2",
                                     "TREERPO_SET": "transport.learner_host=10.1.2.3"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["treerpo", "actor", "--actor-id", "treerpo-actor-2", "--config", "a.yaml",
                                  "--set", "transport.learner_host=10.1.2.3"]


def test_dockerfile():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M) and "FROM ${CUDA_IMAGE}" in text
    assert '".[vllm]"' in text and "deepspeed" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] == "1000"  # = runAsUser in the manifests
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entry[-1] == "treerpo"
    learner_cmd = container(one(render("base"), "Job", "treerpo-learner"))["command"][0]
    assert learner_cmd == "/opt/treerpo/scripts/launch_learner.sh" and "COPY deploy/scripts /opt/treerpo/scripts" in text


# --------------------------------------------------------------------------------------------
# A real Prometheus scraping real metrics endpoints
# --------------------------------------------------------------------------------------------
class FakeRun:
    """Drives real LearnerMetrics/ActorMetrics (no training) so every series moves while scraped."""

    def __init__(self, actor_ids: list[str]):
        self.learner_reg = new_registry()
        self.learner = LearnerMetrics(self.learner_reg)
        self.sync = WeightSyncMetrics(self.learner_reg)
        self.actor_regs = [new_registry() for _ in actor_ids]
        self.actors = [ActorMetrics(r, a) for r, a in zip(self.actor_regs, actor_ids)]
        self.servers = [MetricsServer("127.0.0.1", 0, r).start() for r in [self.learner_reg, *self.actor_regs]]
        self.stop_event = threading.Event()
        self.version = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def tick(self) -> None:
        self.version += 1
        v = self.version
        self.learner.max_staleness.set(4)
        self.learner.buffer_trees.set(v % 5)
        self.learner.buffer_oldest_age.set(1.5)
        self.learner.actors_registered.set(len(self.actors))
        self.learner.trees_in_flight.set(3)
        self.learner.trees_received.inc(4)
        self.learner.consumed([0, 1, 2])
        self.learner.dropped("stale")
        self.learner.idle_seconds.inc(0.05)
        self.learner.step(version=v, tokens=512, duration_s=0.2, loss=0.1, pg_loss=0.1, kl=0.0, approx_kl=0.01,
                          clip_fraction_low=0.01, clip_fraction_high=0.02, is_weight_mean=1.0, is_weight_max=1.5,
                          is_weight_capped_fraction=0.0, entropy=1.2, advantage_mean=0.0, advantage_std=0.7,
                          trainable_token_fraction=0.9, grad_norm=0.8, learning_rate=1e-6, leaf_reward_mean=0.5,
                          accuracy=0.5, response_tokens_mean=120.0)
        self.sync.succeeded(version=v, seconds=0.05, nbytes=1 << 20, actors=len(self.actors))
        if v % 3 == 0:
            self.sync.failed("timeout")
        for i, actor in enumerate(self.actors):
            actor.trees.inc()
            actor.segments.inc(7)
            actor.tokens_generated.inc(300)
            actor.generation_seconds.observe(0.3)
            actor.leaves_scored([1.0, 0.0])
            actor.send_blocked_seconds.inc(0.01)
            actor.credits.set(5)
            actor.connected.set(1)
            actor.reward_results(["ok", "timeout"])
            actor.trees_lost("send_timeout")
            actor.weights_loaded(version=v - i, seconds=0.02)  # actor i lags by i versions

    def _loop(self) -> None:
        while not self.stop_event.wait(0.25):
            self.tick()

    def pause(self) -> None:
        """Stop updating (values stay served), after the tick in progress."""
        self.stop_event.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> "FakeRun":
        self.tick()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        for s in self.servers:
            s.stop()


@pytest.mark.integration
def test_prometheus_scrapes_metrics_servers_and_every_panel_has_data(tmp_path):
    require("prometheus")
    with FakeRun(["treerpo-actor-0", "treerpo-actor-1"]) as fake:
        learner_url, *actor_urls = [f"127.0.0.1:{s.port}" for s in fake.servers]
        targets = {"treerpo-learner": [learner_url], "treerpo-actor": actor_urls}
        with PromStack(targets, tmp_path / "prom") as prom:
            prom.wait_for('up{job=~"treerpo-.*"} == 1', timeout_s=60, min_results=3)
            # enough samples for rate() over the panels' window
            prom.wait_for("count_over_time(treerpo_learner_steps_total[1m]) >= 5", timeout_s=60)
            empty = []
            for row, title, expr in dashboard_queries():
                if is_vllm(expr):
                    continue
                query = expr.replace("$__rate_interval", "10s").replace("$__interval", "1s")
                try:
                    prom.wait_for(query, timeout_s=20)
                except TimeoutError:
                    empty.append(f"{row} / {title}: {expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)
            # values arrive intact: with updates paused, actor i lags the learner by exactly i versions
            fake.pause()
            skew: dict[str, float] = {}
            for _ in range(60):  # until every target has been scraped after the pause
                skew = {r["metric"]["actor_id"]: float(r["value"][1]) for r in prom.query(
                    "max(treerpo_learner_version) - on() group_right treerpo_actor_weight_version")}
                if skew == {"treerpo-actor-0": 0.0, "treerpo-actor-1": 1.0}:
                    break
                time.sleep(0.5)
            assert skew == {"treerpo-actor-0": 0.0, "treerpo-actor-1": 1.0}
            # the shipped alert rules load and evaluate without errors
            rules: list[dict] = []
            for _ in range(60):
                rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
                if rules and all(r["health"] == "ok" for r in rules):
                    break
                time.sleep(0.5)
            assert len(rules) == len(rule_exprs())
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
