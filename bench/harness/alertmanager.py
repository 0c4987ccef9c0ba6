"""The real Alertmanager (Debian's prometheus-alertmanager) with the repo's routes, inhibitions and
templates (monitoring/alertmanager.yml), its receivers pointed at local stand-ins
(bench/harness/receivers.py) and its waits shortened for a short run; with the API calls the
tests make (post alerts, list them) and its own metrics.

Everything it keeps (the rendered config, the notification log and silences, its output) is under
`workdir`; it listens on a free loopback port, with clustering off (no gossip port), and is
stopped by PID like every harness process.
"""

from __future__ import annotations

import copy
from pathlib import Path

import requests
import yaml

from bench.harness.environment import ROOT, free_port
from bench.harness.process import ManagedProcess
from bench.harness.scrape import scrape

CONFIG = ROOT / "monitoring" / "alertmanager.yml"
TIMING = ("group_wait", "group_interval", "repeat_interval")


def render(
    config: dict,
    *,
    smarthost: str,
    webhook_url: str,
    group_wait: str,
    group_interval: str,
    repeat_interval: str,
    base: Path = CONFIG.parent,
) -> dict:
    """The repo's config with the mail going to `smarthost`, every webhook to `webhook_url`/<its
    receiver's name>, the templates' paths made absolute (they are relative to `base`, the repo
    config's directory) and the root route's and every route's waits replaced by these."""
    config = copy.deepcopy(config)
    config["global"]["smtp_smarthost"] = smarthost
    config["global"]["smtp_require_tls"] = False
    config["templates"] = [str(base / pattern) for pattern in config.get("templates", [])]
    timing = {"group_wait": group_wait, "group_interval": group_interval, "repeat_interval": repeat_interval}

    def retime(route: dict, root: bool) -> None:
        for key in TIMING:
            if root or key in route:
                route[key] = timing[key]
        for child in route.get("routes", []):
            retime(child, False)

    retime(config["route"], True)
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{webhook_url}/{receiver['name']}"
    return config


class Alertmanager(ManagedProcess):
    """Alertmanager on a free loopback port; ready when /-/ready answers. `address` is what
    Prometheus' `alerting` section needs."""

    BINARY = "/usr/bin/prometheus-alertmanager"
    name = "alertmanager"

    def __init__(
        self,
        workdir: Path,
        *,
        smarthost: str,
        webhook_url: str,
        group_wait: str = "1s",
        group_interval: str = "1s",
        repeat_interval: str = "1h",
    ) -> None:
        if not Path(self.BINARY).exists():
            raise RuntimeError(
                "Alertmanager is not installed: apt-get install prometheus-alertmanager "
                "(Debian/Ubuntu, with amtool; .ci/system-deps.sh installs it)"
            )
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        config = render(
            yaml.safe_load(CONFIG.read_text()),
            smarthost=smarthost,
            webhook_url=webhook_url,
            group_wait=group_wait,
            group_interval=group_interval,
            repeat_interval=repeat_interval,
        )
        self.config = config
        self.config_path = workdir / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__(
            [
                self.BINARY,
                f"--config.file={self.config_path}",
                f"--storage.path={workdir / 'alertmanager-data'}",
                f"--web.listen-address={self.address}",
                "--cluster.listen-address=",
            ],
            log_path=workdir / "alertmanager.out",
            ready_url=self.url + "/-/ready",
        )

    def mail_receivers(self) -> dict[str, str]:
        """{address: receiver name} of every receiver that mails: who a mail was for."""
        return {
            mail["to"]: receiver["name"]
            for receiver in self.config["receivers"]
            for mail in receiver.get("email_configs", [])
        }

    def post(self, alerts: list[dict]) -> None:
        """Alerts as Prometheus sends them (labels, annotations, startsAt/endsAt)."""
        response = requests.post(self.url + "/api/v2/alerts", json=alerts, timeout=10)
        response.raise_for_status()

    def alerts(self) -> list[dict]:
        """Every alert it holds, with `status.state` (active, suppressed) and `status.inhibitedBy`.
        Note that asking computes the inhibitions at once (the API runs them), outside the
        notification pipeline."""
        response = requests.get(self.url + "/api/v2/alerts", timeout=10)
        response.raise_for_status()
        return response.json()

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Its own samples (alertmanager_alerts{state}, alertmanager_notifications_total, ...)."""
        return scrape(self.url + "/metrics")
