"""Alerts reach a person, end to end: the service under gunicorn (crash route on) on a Postgres of
its own, a real Prometheus scraping it every second, a real Alertmanager with one-second waits,
and the local SMTP server and webhook (bench/harness/receivers.py) as the team's inbox, the
on-call's inbox and the on-call's pager. Real faults, real notifications:

1. A worker crash (GET /auth/crash): the team gets FlaskapiWorkerRestarted by mail, never the
   pager, with the runbook link and a log command that finds the crash's request id in the real
   log; then its resolution.
2. A database outage (the Postgres stopped): on-call gets FlaskapiNotReady by mail and webhook,
   with its labels, runbook link, log command and request-id recipe. The 503s it causes make
   FlaskapiHigh5xxRatio and the availability fast page fire in Prometheus, and Alertmanager holds
   them back (FlaskapiDatabaseWasDown): suppressed, never delivered. Postgres started again: the
   resolution by mail and webhook.

Time-compressed rules: burn-rate windows of hours cannot elapse in a test, so Prometheus loads
the repo's rule files passed through monitoring.slo.compress (the generator's own function):
every window, `for` and group interval divided by SPEEDUP, no window under FLOOR so that rates
have samples at one scrape a second. Same expressions, same order of events, seconds instead of
minutes; promtool proves the real timing on the real files (tests/test_alerting_rules.py).
Everything started here is stopped here; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests
import yaml

from bench.harness.alertmanager import Alertmanager
from bench.harness.commands import run_command
from bench.harness.environment import ROOT
from bench.harness.gunicorn import serving
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from bench.harness.receivers import SmtpReceiver, WebhookReceiver
from monitoring import slo
from service import devdb
from tests.test_faults_stack import dedicated_postgres, start_postgres, stop_postgres  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

SPEEDUP = 20
FLOOR = "5s"
ONCALL, TEAM = "oncall@example.com", "team@example.com"
HELD_BACK = ("FlaskapiHigh5xxRatio", "FlaskapiAvailabilityBudgetBurn")
RECIPE = 'grep \'"request_id": "<id>"\' logs/app.log* | jq .'


class Reads(threading.Thread):
    """A steady client: a page of books ten times a second, every status kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop_event = threading.Event()
        self.statuses: list[int | None] = []

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop_event.is_set():
                try:
                    self.statuses.append(session.get(self.url + "/books/?limit=5", timeout=15).status_code)
                except requests.RequestException:
                    self.statuses.append(None)
                self.stop_event.wait(0.1)


def compressed_rules(directory) -> list:
    paths = []
    for name in yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())["rule_files"]:
        document = yaml.safe_load((ROOT / "monitoring" / name).read_text())
        path = directory / name.replace("/", "-")
        path.write_text(yaml.safe_dump(slo.compress(document, SPEEDUP, floor=FLOOR), sort_keys=False))
        paths.append(path)
    return paths


def mail_of(to: str, alertname: str, status: str):
    """Matches the mail to `to` about `alertname` (its subject: "[FIRING:1] Name (severity) job")."""
    return lambda m: m.to == (to,) and f"] {alertname} (" in m.subject and m.subject.startswith(f"[{status}")


def post_of(alertname: str, status: str | None = None):
    return lambda p: any(a["labels"]["alertname"] == alertname for a in p.alerts) and status in (None, p.body["status"])


def held_back(manager: Alertmanager) -> list[dict] | None:
    """The pages of HELD_BACK as Alertmanager holds them, once there is one of each and every
    one is suppressed."""
    pages = [
        a for a in manager.alerts()
        if a["labels"]["alertname"] in HELD_BACK and a["labels"]["severity"] in ("page", "critical")
    ]  # fmt: skip
    names = {a["labels"]["alertname"] for a in pages}
    return pages if names == set(HELD_BACK) and all(a["status"]["state"] == "suppressed" for a in pages) else None


def migrate(uri: str, workdir) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FLASK_DEBUG", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(DB_URI=uri, FLASK_ENV="development", DATA_DIR=str(workdir), LOG_DIR=str(workdir / "logs"))
    result = run_command([sys.executable, "-m", "flask", "db", "upgrade"], env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


def test_a_crash_and_a_database_outage_reach_the_right_people(dedicated_postgres, tmp_path):  # noqa: F811
    pgdata, handle = dedicated_postgres
    uri = devdb.create_database(handle, "alerts")
    migrate(uri, tmp_path / "migrate")
    began = time.monotonic()
    (tmp_path / "stack").mkdir()
    with (
        SmtpReceiver() as smtp,
        WebhookReceiver() as hook,
        serving(uri, tmp_path / "stack", workers=2, CRASH_ROUTE_ENABLED="1", DB_CONNECT_TIMEOUT="2") as stack,
    ):
        reads = Reads(stack.url)
        reads.start()
        try:
            wait_for(lambda: len(reads.statuses) >= 10, "reads answered")
            with (
                Alertmanager(tmp_path / "am", smarthost=smtp.smarthost, webhook_url=hook.url) as manager,
                Prometheus(
                    tmp_path,
                    targets={"flaskapi": f"127.0.0.1:{stack.metrics_port}"},
                    interval="1s",
                    alertmanager=manager.address,
                    rule_files=compressed_rules(tmp_path),
                ) as prometheus,
            ):
                instance = f"127.0.0.1:{stack.metrics_port}"
                # Every series the alerts read of the app is there on the real stack (a missing one
                # would leave its alerts blind: FlaskapiMetricsAbsent); the exporters' are
                # tests/test_exporters_stack.py's.
                meta = yaml.safe_load((ROOT / "monitoring" / "rules" / "meta.rules.yml").read_text())
                (absent,) = [r for r in meta["groups"][0]["rules"] if r["alert"] == "FlaskapiMetricsAbsent"]
                names = re.findall(r'\((\w+)\{job="flaskapi"\}', absent["expr"])
                assert len(names) == len(re.findall(r'job="flaskapi"', absent["expr"])) >= 10
                for name in names:
                    wait_for(lambda name=name: prometheus.query(f'{name}{{job="flaskapi"}}'), f"{name} scraped")

                # --- 1. a worker crash: a ticket for the team ---
                crash_id = f"alert-crash-{uuid.uuid4().hex[:8]}"
                with pytest.raises(requests.RequestException):
                    requests.get(stack.url + "/auth/crash", headers={"X-Request-ID": crash_id}, timeout=15)
                stack.wait_for_workers(what="the crashed worker replaced")
                ticket = smtp.wait_for(mail_of(TEAM, "FlaskapiWorkerRestarted", "FIRING"), "the crash's ticket")[0]
                labels = f"host=localhost instance={instance} job=flaskapi"  # host: the target file's
                assert f"alertname=FlaskapiWorkerRestarted {labels} severity=warning" in ticket.text
                assert "Runbook: docs/runbooks/FlaskapiWorkerRestarted.md" in ticket.text
                assert RECIPE in ticket.text
                # the mail's log command, run as written where the logs are, finds the crash's id
                command = ticket.text.split("Logs: ", 1)[1].split("\n", 1)[0]
                found = subprocess.run(
                    ["bash", "-c", command], cwd=stack.data_dir, capture_output=True, text=True, timeout=30, check=False
                )
                assert found.returncode == 0 and crash_id in found.stdout, (command, found.stdout, found.stderr)
                smtp.wait_for(mail_of(TEAM, "FlaskapiWorkerRestarted", "RESOLVED"), "the crash's resolution")
                assert hook.received(post_of("FlaskapiWorkerRestarted")) == [], "a ticket reached the pager"

                # --- 2. a database outage: one page, the errors it causes held back ---
                stop_postgres(pgdata, handle)
                try:
                    page = hook.wait_for(post_of("FlaskapiNotReady", "firing"), "the outage's page")[0]
                    assert page.path == "/oncall" and page.body["receiver"] == "oncall"
                    (sent,) = page.alerts
                    assert sent["labels"] == {
                        "alertname": "FlaskapiNotReady", "severity": "critical", "job": "flaskapi",
                        "instance": instance, "host": "localhost",
                    }  # fmt: skip
                    assert sent["annotations"]["runbook_url"] == "docs/runbooks/FlaskapiNotReady.md"
                    assert "request_id" in sent["annotations"]["logs"]
                    mail = smtp.wait_for(mail_of(ONCALL, "FlaskapiNotReady", "FIRING"), "the outage's page by mail")[0]
                    assert mail.subject == "[FIRING:1] FlaskapiNotReady (critical) flaskapi"
                    assert f"alertname=FlaskapiNotReady {labels} severity=critical" in mail.text
                    assert "Runbook: docs/runbooks/FlaskapiNotReady.md" in mail.text
                    assert f"Logs: {sent['annotations']['logs']}" in mail.text and RECIPE in mail.text

                    # The 503s fire the 5xx and availability pages; Alertmanager holds them back.
                    held = wait_for(lambda: held_back(manager), "the 5xx and availability pages held back", timeout=90)
                    firing = {a["labels"]["alertname"] for a in prometheus.alerts() if a["state"] == "firing"}
                    assert set(HELD_BACK) <= firing, firing
                    inhibitors = {a["fingerprint"]: a["labels"]["alertname"] for a in manager.alerts()}
                    for alert in held:
                        assert [inhibitors[f] for f in alert["status"]["inhibitedBy"]] == ["FlaskapiDatabaseWasDown"]
                finally:
                    start_postgres(handle)
                hook.wait_for(post_of("FlaskapiNotReady", "resolved"), "the outage resolved")
                smtp.wait_for(mail_of(ONCALL, "FlaskapiNotReady", "RESOLVED"), "the outage resolved by mail")

                # Nothing the outage explains reached anyone, nor the inhibitor itself.
                for name in (*HELD_BACK, "FlaskapiDatabaseWasDown"):
                    assert hook.received(post_of(name)) == [], f"{name} was posted"
                    assert not [m for m in smtp.received() if f"alertname={name} " in m.text], f"{name} was mailed"
        finally:
            reads.stop_event.set()
            reads.join(30)
    assert 503 in reads.statuses and reads.statuses[-1] == 200
    took = time.monotonic() - began
    print(f"\nalerting end to end: {took:.0f} s, {len(smtp.received())} mails, {len(hook.received())} posts")
