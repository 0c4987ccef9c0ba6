"""The alert and SLO rules without the app: the generated SLO rules up to date with their spec,
every rule file valid and loaded by Prometheus' config, every promtool unit test passing, every
alert (and every burn-rate tier) with a test that fires and one that stays quiet, every alert
documented by a runbook of its own, every series the alerts read watched for absence, and every
expression parsed and evaluated by a real Prometheus.

Needs `promtool` and `prometheus` (Debian: `apt-get install prometheus`); a missing binary fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
import yaml

from bench.harness.environment import ROOT
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from monitoring import slo
from tests.deploy_tools import run, tool

MONITORING = ROOT / "monitoring"
RULES_DIR = MONITORING / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
RULE_TESTS = sorted(RULES_DIR.glob("*.rules.test.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks"
SEVERITIES = {"critical", "warning", "page", "ticket", "none"}
ANNOTATIONS = {"summary", "description", "runbook_url", "logs"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def rules(kind: str) -> list[dict]:
    """Every rule of `kind` ("alert" or "record") in every rule file, a tier being a rule."""
    return [
        rule for path in RULE_FILES for group in load_yaml(path)["groups"] for rule in group["rules"] if kind in rule
    ]


def alerts() -> dict[str, list[dict]]:
    """{alert name: its rules} (an SLO alert has one rule per tier)."""
    found: dict[str, list[dict]] = {}
    for rule in rules("alert"):
        found.setdefault(rule["alert"], []).append(rule)
    return found


# --- the SLO generator ------------------------------------------------------------------------------


def test_slo_rules_are_what_the_spec_generates():
    assert slo.main(["--check"]) == 0, "run `python -m monitoring.slo`"


def test_the_up_to_date_check_sees_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "slo.rules.yml"
    stale.write_text(slo.RULES.read_text().replace("> 14.4", "> 10", 1))
    monkeypatch.setattr(slo, "RULES", stale)
    assert slo.main(["--check"]) == 1
    assert "python -m monitoring.slo" in capsys.readouterr().err


def test_a_latency_threshold_must_be_a_bucket_bound(tmp_path):
    spec = load_yaml(slo.SPEC)
    spec["slos"][1]["threshold"] = 0.2  # between the 0.15 and 0.25 buckets
    path = tmp_path / "slo.yml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="not a bucket bound"):
        slo.load(path)


def test_every_slo_has_its_recording_rules_and_every_tier():
    spec = slo.load()
    recorded = {(rule["record"], rule["labels"]["slo"]) for rule in rules("record")}
    tiers = {
        (rule["alert"], rule["labels"]["slo"], rule["labels"]["window"])
        for rule in rules("alert")
        if "slo" in rule["labels"]
    }
    assert slo.windows(spec) == ["5m", "30m", "1h", "6h", "3d"]
    assert spec["period"] == "30d"  # the budget's window, recorded too (the dashboard's budget left)
    for objective in spec["slos"]:
        for window in [*slo.windows(spec), spec["period"]]:
            for name in ("requests", "error_ratio"):
                assert (f"flaskapi_slo:{name}:rate{window}", objective["name"]) in recorded
        assert {t for t in tiers if t[1] == objective["name"]} == {
            (objective["alert"], objective["name"], tier["long"]) for tier in spec["tiers"]
        }


def test_long_windows_and_the_budget_are_evaluated_less_often():
    spec = slo.load()
    groups = {group["name"]: group for group in load_yaml(slo.RULES)["groups"]}
    for objective in spec["slos"]:
        name = f"flaskapi-slo-{objective['name']}"
        assert "interval" not in groups[name], "the pages' short windows: at the global interval"
        assert groups[f"{name}-slow"]["interval"] == spec["slow_windows_interval"]
        budget = groups[f"{name}-budget"]
        assert budget["interval"] == spec["budget_interval"]
        assert [rule["record"] for rule in budget["rules"]] == [
            f"flaskapi_slo:requests:rate{spec['period']}",
            f"flaskapi_slo:error_ratio:rate{spec['period']}",
        ]


def test_compress_shortens_windows_fors_and_intervals_but_not_below_the_floor():
    document = {
        "groups": [
            {
                "name": "g",
                "interval": "1m",
                "rules": [
                    {"alert": "A", "expr": 'rate(x{a=~"[45].."}[1h]) > 0 and rate(y[1m]) > 0', "for": "2m"},
                    {"record": "r", "expr": "max_over_time(z[3d])"},
                    {"alert": "B", "expr": "up == 0", "for": "0s"},
                ],
            }
        ]
    }
    fast = slo.compress(document, 20, floor="5s")["groups"][0]
    assert fast["interval"] == "3s"
    assert fast["rules"][0] == {"alert": "A", "expr": 'rate(x{a=~"[45].."}[3m]) > 0 and rate(y[5s]) > 0', "for": "6s"}
    assert fast["rules"][1]["expr"] == "max_over_time(z[216m])"
    assert fast["rules"][2]["for"] == "0s"
    assert document["groups"][0]["rules"][0]["for"] == "2m", "the original is left as it was"


# --- rule files ----------------------------------------------------------------------------------


def test_prometheus_loads_every_rule_file():
    config = load_yaml(MONITORING / "prometheus.yml")
    assert sorted(MONITORING / path for path in config["rule_files"]) == RULE_FILES
    assert [a["static_configs"][0]["targets"] for a in config["alerting"]["alertmanagers"]] == [["127.0.0.1:9093"]]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_are_valid(path):
    output = run([tool("promtool"), "check", "rules", path]).stdout
    count = sum(len(group["rules"]) for group in load_yaml(path)["groups"])
    assert f"{count} rules found" in output, output


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(path):
    run([tool("promtool"), "test", "rules", path], cwd=RULES_DIR, timeout=180)


def test_every_rule_file_has_unit_tests():
    tested = {RULES_DIR / name for path in RULE_TESTS for name in load_yaml(path)["rule_files"]}
    assert tested == set(RULE_FILES)


def test_every_alert_and_every_tier_has_a_firing_and_a_silent_unit_test():
    """A tier (a rule) fires in a case if an expected alert carries its labels, and stays quiet
    in a check of its alert where none does."""
    tiers = {(rule["alert"], rule["labels"].get("window")) for rule in rules("alert")}
    firing, silent = set(), set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                name = check["alertname"]
                active = {(name, alert["exp_labels"].get("window")) for alert in check.get("exp_alerts") or []}
                firing |= active
                silent |= {tier for tier in tiers if tier[0] == name} - active
    assert tiers - firing == set(), "tiers without a test that fires"
    assert tiers - silent == set(), "tiers without a test that must stay silent"
    assert {name for name, _ in firing | silent} <= set(alerts()), "tests for alerts that do not exist"


def test_every_alert_is_complete():
    for name, tiers in alerts().items():
        for rule in tiers:
            assert rule["labels"]["severity"] in SEVERITIES, name
            assert "for" in rule, f"{name}: say `for: 0s` explicitly when it fires at once"
            annotations = rule.get("annotations", {})
            assert set(annotations) == ANNOTATIONS, f"{name}: {sorted(annotations)}"
            assert all(value.strip() for value in annotations.values()), name
            assert annotations["runbook_url"] == f"docs/runbooks/{name}.md", name
            assert "logs/app.log" in annotations["logs"] or "journalctl" in annotations["logs"], name


# --- runbooks ----------------------------------------------------------------------------------


def test_every_alert_has_its_runbook_and_every_runbook_an_alert():
    pages = {path.stem for path in RUNBOOKS.glob("*.md")} - {"README"}
    assert pages == set(alerts())
    index = (RUNBOOKS / "README.md").read_text()
    for name in alerts():
        text = (RUNBOOKS / f"{name}.md").read_text()
        assert text.startswith(f"# {name}\n"), name
        assert f"({name}.md)" in index, f"{name} is not in docs/runbooks/README.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_runbook_links_resolve():
    broken = []
    for page in sorted(RUNBOOKS.glob("*.md")):
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


# --- series the alerts read ----------------------------------------------------------------------

SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)\{")


def test_every_series_an_alert_reads_is_watched_for_absence():
    """FlaskapiMetricsAbsent names each series it watches in its `metric` label; every selector
    of every alert and recording rule (recorded series and ALERTS aside) must be among them."""
    read = {name for rule in rules("alert") + rules("record") for name in SELECTOR.findall(rule["expr"])}
    read = {name for name in read if ":" not in name} - {"ALERTS"}
    (absent,) = alerts()["FlaskapiMetricsAbsent"]
    watched = set(re.findall(r'"metric", "(\w+)"', absent["expr"]))
    assert read - watched == set(), "series read by an alert that nothing watches for absence"
    assert watched - read - {"up"} == set(), "watched series no alert reads"


# --- a real Prometheus -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus with the repo's config and every rule file, no targets; stopped by PID."""
    tool("prometheus")
    with Prometheus(tmp_path_factory.mktemp("prometheus"), targets={}, interval="1s") as server:
        yield server


def query(prometheus: Prometheus, expr: str) -> dict:
    response = requests.get(prometheus.url + "/api/v1/query", params={"query": expr}, timeout=10)
    return {"http": response.status_code, **response.json()}


def test_prometheus_loaded_every_rule_and_evaluates_them(prometheus):
    """Every rule loaded; those at the global interval (1 s here) evaluated without error. The
    slow windows' groups run once a minute: their expressions are checked below instead."""

    def evaluated():
        groups = requests.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        fast = [rule for group in groups if group["interval"] == 1 for rule in group["rules"]]
        done = fast and all(rule["lastEvaluation"].startswith("2") for rule in fast)
        return groups if done else None

    groups = wait_for(evaluated, "the rules at the global interval evaluated once", timeout=60)
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rules("alert")) + len(rules("record"))
    assert {group["name"] for group in groups} == {g["name"] for p in RULE_FILES for g in load_yaml(p)["groups"]}
    assert [
        rule["name"] for group in groups if group["interval"] == 1 for rule in group["rules"] if rule["health"] != "ok"
    ] == []


def test_every_rule_expr_is_valid_promql(prometheus):
    assert query(prometheus, "sum(rate(flask_http_request_total[1m])")["errorType"] == "bad_data"
    failures = []
    for rule in rules("alert") + rules("record"):
        answer = query(prometheus, rule["expr"])
        if answer.get("status") != "success":
            failures.append(f"{rule.get('alert') or rule['record']}: {answer.get('errorType')}: {answer.get('error')}")
    assert failures == []


def test_a_short_run_evaluates_the_long_windows_and_the_budget_at_the_global_interval(tmp_path):
    """The harness option the demo and the dashboard's end-to-end test use: the groups with an
    interval of their own (once a minute, every 5 minutes) evaluated every second like the others,
    with the same rules."""
    tool("prometheus")
    with Prometheus(tmp_path, targets={}, interval="1s", every_group_at_interval=True) as server:

        def evaluated():
            groups = requests.get(server.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            done = all(rule["lastEvaluation"].startswith("2") for group in groups for rule in group["rules"])
            return groups if done else None

        groups = wait_for(evaluated, "every rule evaluated once", timeout=60)
    assert {group["interval"] for group in groups} == {1}
    originals = {g["name"]: g for path in RULE_FILES for g in load_yaml(path)["groups"]}
    assert {g["name"] for g in groups} == set(originals) and any("interval" in g for g in originals.values())
    for group in groups:
        loaded = [(rule["name"], rule.get("duration", 0)) for rule in group["rules"]]
        assert loaded == [
            (rule.get("alert") or rule["record"], slo.seconds(rule.get("for", "0s")) if "alert" in rule else 0)
            for rule in originals[group["name"]]["rules"]
        ], group["name"]
