"""The real Prometheus binary with the repo's config and rules (monitoring/), its targets
pointed at the given loopback ports and its intervals shortened for a short run; with the two
API calls the tests and the report make (query, query_range)."""

from __future__ import annotations

from pathlib import Path

import requests
import yaml

from bench.harness.environment import ROOT, free_port
from bench.harness.process import ManagedProcess


class Prometheus(ManagedProcess):
    """Prometheus on a free loopback port, its config, TSDB and log under `workdir`; ready when
    /-/ready answers."""

    BINARY = "/usr/bin/prometheus"
    name = "prometheus"

    def __init__(self, workdir: Path, *, targets: dict[str, str], interval: str = "5s") -> None:
        """`targets`: {job name: host:port}; the repo's jobs not named get no target."""
        if not Path(self.BINARY).exists():
            raise RuntimeError(
                "Prometheus is not installed: apt-get install prometheus (Debian/Ubuntu; .ci/run installs it)"
            )
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
        config["rule_files"] = [str(ROOT / "monitoring" / rule) for rule in config.get("rule_files", [])]
        targets = {**targets, "prometheus": f"127.0.0.1:{self.port}"}
        for job in config["scrape_configs"]:
            job["scrape_interval"] = interval
            job["scrape_timeout"] = interval
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}] if job["job_name"] in targets else []
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        super().__init__(
            [
                self.BINARY,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            log_path=workdir / "prometheus.out",
            ready_url=self.url + "/-/ready",
        )

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        response = requests.get(
            self.url + "/api/v1/query_range",
            timeout=30,
            params={"query": expr, "start": start, "end": end, "step": step},
        )
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        body = requests.get(self.url + "/api/v1/query", params=params, timeout=30).json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]
