"""Alertmanager with the repo's config (monitoring/alertmanager.yml): amtool checks it and tests
every alert's route; a real Alertmanager, with a local SMTP server and webhook receiver, renders
the notifications and applies every inhibition.

amtool cannot test an inhibition, so each one is tested on the real process: the source is posted
first, then the target with a control alert that no rule holds back (as Prometheus posts them:
a source's `for` is shorter than its targets'). The source (where it routes anywhere) and the
control must be delivered; the target must be marked suppressed by the notification pipeline
(`alertmanager_alerts{state="suppressed"}`, which only that pipeline sets here: the alerts API,
which sets it too, is asked only afterwards) and must never be delivered.

Needs `prometheus-alertmanager` and `amtool` (Debian: `apt-get install prometheus-alertmanager`).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from bench.harness import alertmanager as harness
from bench.harness.alertmanager import Alertmanager
from bench.harness.environment import ROOT
from bench.harness.polling import wait_for
from bench.harness.receivers import SmtpReceiver, WebhookReceiver
from bench.harness.scrape import metric
from tests.deploy_tools import run, tool

CONFIG = harness.CONFIG
RULE_FILES = sorted((ROOT / "monitoring" / "rules").glob("*.rules.yml"))
RECEIVER_OF = {"critical": "oncall", "page": "oncall", "warning": "team", "ticket": "team", "none": "null"}
ONCALL, TEAM = "oncall@example.com", "team@example.com"


def amtool(*args: str, check: bool = True):
    return run([tool("amtool"), *args], check=check, cwd=ROOT)


def alert_rules() -> list[dict]:
    return [
        r for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "alert" in r
    ]


# --- amtool --------------------------------------------------------------------------------------


def test_config_is_valid(tmp_path):
    output = amtool("check-config", str(CONFIG)).stdout
    assert "SUCCESS" in output and "1 templates" in output, output
    # amtool parses the templates it finds but does not say when a pattern finds none
    assert all(list(CONFIG.parent.glob(pattern)) for pattern in yaml.safe_load(CONFIG.read_text())["templates"])
    # and as the tests run it: rendered with local receivers, templates by absolute path
    rendered = harness.render(
        yaml.safe_load(CONFIG.read_text()),
        smarthost="127.0.0.1:2525",
        webhook_url="http://127.0.0.1:8080",
        group_wait="1s",
        group_interval="1s",
        repeat_interval="1h",
    )
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(rendered))
    amtool("check-config", str(tmp_path / "alertmanager.yml"))


def route(labels: dict[str, str]) -> str:
    pairs = [f"{k}={v}" for k, v in sorted(labels.items())]
    return amtool("config", "routes", "test", f"--config.file={CONFIG}", *pairs).stdout.strip()


@pytest.mark.parametrize(
    "rule", alert_rules(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}-{r['labels'].get('window', '')}"
)
def test_every_alert_routes_to_the_receiver_of_its_severity(rule):
    labels = {"alertname": rule["alert"], "job": "flaskapi", "instance": "app:9200", **rule["labels"]}
    expected = RECEIVER_OF[rule["labels"]["severity"]]
    result = amtool(
        "config", "routes", "test", f"--config.file={CONFIG}", f"--verify.receivers={expected}",
        *[f"{k}={v}" for k, v in sorted(labels.items())], check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{rule['alert']} goes to {result.stdout.strip()}, not {expected}"


def test_an_unknown_severity_still_reaches_the_team_and_a_wrong_receiver_is_caught():
    assert route({"alertname": "SomethingNew", "severity": "info"}) == "team"
    wrong = amtool(
        "config", "routes", "test", f"--config.file={CONFIG}", "--verify.receivers=team", "severity=page", check=False
    )
    assert wrong.returncode != 0


# --- a real Alertmanager -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Receivers and an Alertmanager whose waits are a second; all stopped at the end."""
    tool("prometheus-alertmanager")
    workdir = tmp_path_factory.mktemp("alertmanager")
    with (
        SmtpReceiver() as smtp,
        WebhookReceiver() as hook,
        Alertmanager(workdir, smarthost=smtp.smarthost, webhook_url=hook.url) as manager,
    ):
        yield manager, smtp, hook


def new_job() -> str:
    """Each case's alerts carry a job of their own, so cases never inhibit or group each other."""
    return f"case-{uuid.uuid4().hex[:8]}"


def rule_of(alert: str, labels: dict[str, str]) -> dict:
    """The repo's rule for `alert` (the tier whose labels `labels` agree with)."""
    (rule,) = [
        r for r in alert_rules() if r["alert"] == alert and all(r["labels"].get(k, v) == v for k, v in labels.items())
    ]
    return rule


def rule_annotations(alert: str, **labels) -> dict[str, str]:
    """The annotations of the repo's rule, its templates filled with these labels."""
    rule = rule_of(alert, labels)
    values = {"$value": "1", **{f"$labels.{k}": v for k, v in labels.items()}}

    def fill(text: str) -> str:
        return re.sub(r"\{\{ *(\$[\w.]+)[^}]*\}\}", lambda m: values.get(m.group(1), m.group(0)), text)

    return {key: fill(value) for key, value in rule["annotations"].items()}


def alert(name: str, job: str, *, ends_in: float = 600, **labels: str) -> dict:
    """An alert as Prometheus posts it, starting now: the rule's labels and annotations, firing
    until ends_in seconds from now (a past end resolves it). Starting now matters: Alertmanager
    sends a new group at once, without group_wait, when its alert started longer ago than that."""
    now = datetime.now(UTC)
    all_labels = {**rule_of(name, labels)["labels"], **labels, "alertname": name, "job": job}
    return {
        "labels": all_labels,
        "annotations": rule_annotations(name, **{k: v for k, v in all_labels.items() if k != "alertname"}),
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(seconds=ends_in)).isoformat(),
        "generatorURL": "http://prometheus.test/graph",
    }


def posted(hook: WebhookReceiver, job: str, **labels) -> list[dict]:
    """Every alert of `job` with `labels` the webhook received."""
    return [
        a for p in hook.received() for a in p.alerts
        if a["labels"]["job"] == job and all(a["labels"].get(k) == v for k, v in labels.items())
    ]  # fmt: skip


def label_line(alert: dict) -> str:
    """How the mail template writes an alert's labels: sorted name=value pairs."""
    return " ".join(f"{k}={v}" for k, v in sorted(alert["labels"].items()))


def suppressed(manager: Alertmanager) -> float:
    return metric(manager.metrics(), "alertmanager_alerts", state="suppressed")


def test_a_page_is_mailed_and_posted_with_its_runbook_and_recipes_then_resolved(stack):
    manager, smtp, hook = stack
    job = new_job()
    firing = alert("FlaskapiNotReady", job, instance="app:9200")
    manager.post([firing])

    post = hook.wait_for(lambda p: p.path == "/oncall" and posted_in(p, job), "the page on the webhook")[0]
    assert post.body["status"] == "firing" and post.body["receiver"] == "oncall"
    (sent,) = post.alerts
    assert sent["labels"] == {
        "alertname": "FlaskapiNotReady",
        "severity": "critical",
        "job": job,
        "instance": "app:9200",
    }
    assert sent["annotations"]["runbook_url"] == "docs/runbooks/FlaskapiNotReady.md"
    assert "request_id" in sent["annotations"]["logs"]

    mail = smtp.wait_for(lambda m: label_line(firing) in m.text, "the page by mail")[0]
    assert mail.to == (ONCALL,)
    assert mail.subject == f"[FIRING:1] FlaskapiNotReady (critical) {job}"
    assert "FIRING: flaskapi cannot reach its database" in mail.text
    assert "The master's database probe on app:9200 fails" in mail.text  # the description, filled
    assert f"alertname=FlaskapiNotReady instance=app:9200 job={job} severity=critical" in mail.text
    assert "Runbook: docs/runbooks/FlaskapiNotReady.md" in mail.text
    assert f"Logs: {firing['annotations']['logs']}" in mail.text
    assert 'grep \'"request_id": "<id>"\' logs/app.log* | jq .' in mail.text
    assert 'href="docs/runbooks/FlaskapiNotReady.md"' in mail.html

    manager.post([{**firing, "endsAt": datetime.now(UTC).isoformat()}])
    hook.wait_for(lambda p: posted_in(p, job) and p.body["status"] == "resolved", "the resolution on the webhook")
    resolved = smtp.wait_for(lambda m: label_line(firing) in m.text and "RESOLVED" in m.subject, "the resolution")[0]
    assert resolved.subject == f"[RESOLVED] FlaskapiNotReady (critical) {job}"
    assert "RESOLVED: flaskapi cannot reach its database" in resolved.text and ", resolved " in resolved.text


def posted_in(post, job: str) -> bool:
    return any(a["labels"]["job"] == job for a in post.alerts)


def test_a_ticket_is_mailed_to_the_team_only(stack):
    manager, smtp, hook = stack
    job = new_job()
    ticket = alert("FlaskapiWorkerRestarted", job, instance="app:9200")
    manager.post([ticket])
    mail = smtp.wait_for(lambda m: label_line(ticket) in m.text, "the ticket by mail")[0]
    assert mail.to == (TEAM,) and mail.subject == f"[FIRING:1] FlaskapiWorkerRestarted (warning) {job}"
    assert "Runbook: docs/runbooks/FlaskapiWorkerRestarted.md" in mail.text
    # A page posted after it reaches the webhook; the ticket never did.
    page = new_job()
    manager.post([alert("FlaskapiTargetDown", page, instance="app:9200")])
    hook.wait_for(lambda p: posted_in(p, page), "a later page on the webhook")
    assert posted(hook, job) == []


def test_every_alert_is_delivered_to_its_receivers(stack):
    """One alert of every rule (every tier), each in a job of its own so that none holds back
    another: a page by mail to on-call and on the webhook, a ticket by mail to the team only,
    the inhibitor to nobody."""
    manager, smtp, hook = stack
    sent = [alert(r["alert"], new_job(), instance="app:9200", **r["labels"]) for r in alert_rules()]
    manager.post(sent)
    expected = {"oncall": ((ONCALL,), 1), "team": ((TEAM,), 0), "null": (None, 0)}
    for one in sent:
        to, posts = expected[RECEIVER_OF[one["labels"]["severity"]]]
        if to is not None:
            smtp.wait_for(lambda m, one=one, to=to: label_line(one) in m.text and m.to == to, f"{one['labels']} mailed")
        if posts:
            hook.wait_for(lambda p, one=one: p.path == "/oncall" and posted_in(p, one["labels"]["job"]), "posted")
    for one in sent:
        to, posts = expected[RECEIVER_OF[one["labels"]["severity"]]]
        assert len([m for m in smtp.received() if label_line(one) in m.text]) == (to is not None), one["labels"]
        assert len([p for p in hook.received() if posted_in(p, one["labels"]["job"])]) == posts, one["labels"]


INHIBITIONS = {
    "a target down holds back its instance's alerts": (
        [("FlaskapiTargetDown", {"instance": "a:9200"})],
        [("FlaskapiHigh5xxRatio", {"instance": "a:9200"}), ("FlaskapiWorkerRestarted", {"instance": "a:9200"})],
        [("FlaskapiHigh5xxRatio", {"instance": "b:9200"}), ("FlaskapiWorkerRestarted", {"instance": "b:9200"})],
    ),
    "a target down holds back the job's missing series": (
        [("FlaskapiTargetDown", {"instance": "a:9200"})],
        [("FlaskapiMetricsAbsent", {"metric": "flaskapi_database_up"})],
        [("FlaskapiMetricsAbsent", {"metric": "flaskapi_database_up", "job": "another"})],
    ),
    "an exporter down holds back its job's missing series": (
        [("FlaskapiExporterDown", {"instance": "db:9187", "host": "db"})],
        [("FlaskapiMetricsAbsent", {"metric": "pg_stat_activity_count"})],
        [("FlaskapiMetricsAbsent", {"metric": "pg_stat_activity_count", "job": "another"})],
    ),
    "a database outage holds back the 5xx and availability pages": (
        [("FlaskapiDatabaseWasDown", {"instance": "a:9200"}), ("FlaskapiNotReady", {"instance": "a:9200"})],
        [("FlaskapiHigh5xxRatio", {"instance": "a:9200"}), ("FlaskapiAvailabilityBudgetBurn", {"window": "1h"})],
        [
            ("FlaskapiBooksLatencyBudgetBurn", {"window": "1h"}),
            ("FlaskapiDbPoolCheckoutTimeouts", {"instance": "a:9200"}),
        ],
    ),
    "a page holds back the same SLO's ticket": (
        [("FlaskapiAvailabilityBudgetBurn", {"window": "1h"})],
        [("FlaskapiAvailabilityBudgetBurn", {"window": "3d"})],
        [("FlaskapiBooksLatencyBudgetBurn", {"window": "3d"})],
    ),
}


@pytest.mark.parametrize("case", INHIBITIONS)
def test_inhibition(stack, case):
    manager, smtp, hook = stack
    job = new_job()

    def make(specs) -> list[dict]:
        made = []
        for name, labels in specs:
            own = dict(labels)
            made.append(alert(name, job + own.pop("job", ""), **own))
        return made

    def delivered(sent: dict) -> bool:
        if RECEIVER_OF[sent["labels"]["severity"]] == "null":
            return True  # an inhibitor: sent to nobody by design
        return any(label_line(sent) in m.text for m in smtp.received())

    # The sources first, as Prometheus has them active before the alerts they explain (their
    # `for` is shorter); then the targets and the controls, which group_wait holds a second.
    sources = make(INHIBITIONS[case][0])
    manager.post(sources)
    for sent in sources:
        wait_for(lambda sent=sent: delivered(sent), f"{sent['labels']['alertname']} delivered")
    targets, controls = make(INHIBITIONS[case][1]), make(INHIBITIONS[case][2])
    before = suppressed(manager)
    manager.post(targets + controls)
    for sent in controls:
        wait_for(lambda sent=sent: delivered(sent), f"{sent['labels']['alertname']} delivered")
    wait_for(lambda: suppressed(manager) >= before + len(targets), f"{len(targets)} alerts held back at notification")
    for target in targets:
        assert not [m for m in smtp.received() if label_line(target) in m.text], f"{target['labels']} was mailed"
        assert not [a for p in hook.received() for a in p.alerts if a["labels"] == target["labels"]], "posted"
    # The API agrees (asking it runs the inhibitions again: only now, after the checks above).
    status = {label_line(a): a["status"] for a in manager.alerts() if a["labels"]["job"].startswith(job)}
    for target in targets:
        assert status[label_line(target)]["state"] == "suppressed" and status[label_line(target)]["inhibitedBy"]
    for control in controls:
        assert status[label_line(control)]["state"] == "active", control["labels"]
