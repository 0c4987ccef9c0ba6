"""The real Prometheus binary with the repo's config and rules (monitoring/), its targets
pointed at the given loopback ports (in the jobs' target files where the config discovers them
there, as deployed) and its intervals shortened for a short run; with the API
calls the tests and the report make (query, query_range, alerts). It sends alerts only to the
Alertmanager it is given (bench/harness/alertmanager.py), never to the config's."""

from __future__ import annotations

from pathlib import Path

import requests
import yaml

from bench.harness.environment import ROOT, free_port
from bench.harness.exporters import write_targets
from bench.harness.process import ManagedProcess

# Keeps the exemplars it scrapes (the latency buckets' trace ids, exemplars.py), as every
# Prometheus of the project runs: docker-compose.yml, the systemd drop-in.
EXEMPLAR_STORAGE = "--enable-feature=exemplar-storage"


class Prometheus(ManagedProcess):
    """Prometheus on a free loopback port, its config, TSDB and log under `workdir`; ready when
    /-/ready answers."""

    BINARY = "/usr/bin/prometheus"
    name = "prometheus"

    def __init__(
        self,
        workdir: Path,
        *,
        targets: dict[str, str],
        interval: str = "5s",
        alertmanager: str | None = None,
        rule_files: list[Path] | None = None,
        every_group_at_interval: bool = False,
    ) -> None:
        """`targets`: {job name: host:port}; the repo's jobs not named get no target (but what a
        caller wrote in their target files under `workdir`: several instances, bench/harness/
        fleet.py). A job the config discovers in a file (file_sd_configs: flaskapi, node,
        postgres) gets its file written under `workdir`, the target labelled `host: localhost`
        as in monitoring/targets/, so its series carry the labels they carry when deployed; the
        others get a static target.
        `alertmanager`: host:port to send alerts to (None: alerts stay in Prometheus).
        `rule_files`: instead of the repo's (a time-compressed copy, monitoring/slo.py).
        `every_group_at_interval`: the rule groups that have an `interval` of their own (the SLO's
        long windows once a minute, its budget every 5 minutes) evaluated at `interval` like the
        others, from copies of the files under `workdir`: a run of seconds would otherwise end
        before they were evaluated once. Same expressions and `for`s, evaluated more often."""
        if not Path(self.BINARY).exists():
            raise RuntimeError(
                "Prometheus is not installed: apt-get install prometheus (Debian/Ubuntu; .ci/run installs it)"
            )
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
        if rule_files is None:
            rule_files = [ROOT / "monitoring" / rule for rule in config.get("rule_files", [])]
        if every_group_at_interval:
            rule_files = [self._at_global_interval(Path(path)) for path in rule_files]
        config["rule_files"] = [str(path) for path in rule_files]
        alerting = config.pop("alerting", None)
        if alertmanager is not None:
            config["alerting"] = alerting or {"alertmanagers": [{}]}
            for entry in config["alerting"]["alertmanagers"]:
                entry["static_configs"] = [{"targets": [alertmanager]}]
        targets = {**targets, "prometheus": f"127.0.0.1:{self.port}"}
        for job in config["scrape_configs"]:
            job["scrape_interval"] = interval
            job["scrape_timeout"] = interval
            name = job["job_name"]
            address = targets.get(name)
            if "file_sd_configs" in job:
                if address is not None:
                    write_targets(workdir, name, {"localhost": address})
            else:
                job["static_configs"] = [{"targets": [address]}] if address is not None else []
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        super().__init__(
            [
                self.BINARY,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                EXEMPLAR_STORAGE,
            ],
            log_path=workdir / "prometheus.out",
            ready_url=self.url + "/-/ready",
        )

    def _at_global_interval(self, path: Path) -> Path:
        document = yaml.safe_load(path.read_text())
        for group in document["groups"]:
            group.pop("interval", None)
        copy = self.workdir / "rules" / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(yaml.safe_dump(document, sort_keys=False))
        return copy

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

    def query_exemplars(self, expr: str, start: float, end: float) -> list[dict]:
        """/api/v1/query_exemplars: per series of `expr`, its exemplars between start and end."""
        params = {"query": expr, "start": start, "end": end}
        body = requests.get(self.url + "/api/v1/query_exemplars", params=params, timeout=30).json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]

    def alerts(self) -> list[dict]:
        """The alerts its rules hold now, pending or firing, with labels and `state`."""
        body = requests.get(self.url + "/api/v1/alerts", timeout=30).json()
        return body["data"]["alerts"]
