"""A real Prometheus (Debian's `prometheus` binary) for tests: loopback only, own storage, stopped by pid.

    with PromStack({"treerpo-learner": ["127.0.0.1:9400"], "treerpo-actor": [...]}, tmp_path) as prom:
        prom.wait_for('up{job="treerpo-learner"} == 1')
        result = prom.query("treerpo_learner_version")

The scrape config is deploy/prometheus/prometheus.yml with its targets replaced (so the job names
and rule files the deploy ships are the ones tested), a 1 s scrape interval, and the rule file
copied beside it. (`common.metrics.promql_metric_names(expr)` pulls metric names out of PromQL.)
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.support.paths import REPO
from tests.support.tools import require_tool

PROM_DIR = REPO / "deploy" / "prometheus"
SCRAPE_TEMPLATE = PROM_DIR / "prometheus.yml"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_scrape_config(targets: dict[str, list[str]], interval: str = "1s",
                         template: Path = SCRAPE_TEMPLATE) -> dict:
    """The shipped scrape config with each job's targets replaced; jobs must exist in the template."""
    cfg = yaml.safe_load(template.read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    unknown = set(targets) - set(jobs)
    if unknown:
        raise ValueError(f"jobs {sorted(unknown)} are not in {template}; known: {sorted(jobs)}")
    for name, job in jobs.items():
        labels = job["static_configs"][0].get("labels", {})
        job["static_configs"] = [{"targets": list(targets.get(name, [])), "labels": labels}]
    cfg["global"]["scrape_interval"] = interval
    cfg["global"]["evaluation_interval"] = interval
    return cfg


class PromStack:
    """One Prometheus process on 127.0.0.1:<free port>, storage under `workdir`."""

    def __init__(self, targets: dict[str, list[str]], workdir: Path, interval: str = "1s",
                 binary: str = "prometheus"):
        self.workdir = Path(workdir)
        self.targets, self.interval = targets, interval
        self.binary = require_tool(binary)  # skips the calling test when it is not installed
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> PromStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(render_scrape_config(self.targets, self.interval), sort_keys=False))
        for rule_file in yaml.safe_load(SCRAPE_TEMPLATE.read_text()).get("rule_files", []):
            shutil.copy(PROM_DIR / rule_file, self.workdir / rule_file)
        self.port = free_port()
        cmd = [
            self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
            "--web.console.templates=/nonexistent", "--web.console.libraries=/nonexistent",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready within {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise RuntimeError(f"prometheus {path} {params}: HTTP {e.code}: {detail}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result vector (or a one-element list for a scalar)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout_s: float = 30.0, min_results: int = 1) -> list[dict]:
        """Poll `expr` until it returns at least `min_results` series; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if len(result) >= min_results:
                return result
            time.sleep(0.5)
        raise TimeoutError(f"{expr!r} returned {len(result)} series (< {min_results}) within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> PromStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
