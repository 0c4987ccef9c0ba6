"""The dashboard's exemplars lead somewhere: Grafana's exemplar link (both datasource files) names
the exemplar label the service writes and opens the log recipe that exists in docs/logging.md,
and every latency panel over the request histogram shows exemplars. (No Grafana runs here: this
is what Grafana reads, checked against what the service and the docs really have.)"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from bench.harness.environment import ROOT
from service.observability import exemplars

DATASOURCES = [
    ROOT / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
    ROOT / "deploy" / "compose" / "grafana" / "datasource.yml",
]
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "flaskapi.json"


def github_slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DATASOURCES, ids=lambda p: p.parent.name + "/" + p.name)
def test_an_exemplars_link_names_the_services_trace_label_and_opens_the_log_recipe(path):
    (source,) = yaml.safe_load(path.read_text())["datasources"]
    (link,) = source["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] in exemplars.exemplar_labels("0" * 31 + "1", "r-1")  # the label the service writes
    # "$$" is provisioning's literal "$": Grafana then fills in the exemplar's trace id.
    url = link["url"]
    assert "=$${__value.raw}" in url, url
    document, anchor = re.fullmatch(
        r"\$FLASKAPI_DOCS_URL/([\w./-]+)\?trace_id=\$\$\{__value\.raw\}#([\w-]+)", url
    ).groups()
    headings = [
        line.lstrip("#") for line in (ROOT / "docs" / document).read_text().splitlines() if line.startswith("#")
    ]
    assert anchor in {github_slug(h) for h in headings}, f"{document} has no heading for #{anchor}"


def test_every_latency_panel_over_the_request_histogram_shows_exemplars():
    board = json.loads(DASHBOARD.read_text())
    bucket = exemplars.LATENCY_METRIC + "_bucket"
    latency = [
        (panel["title"], target)
        for panel in board["panels"]
        if panel.get("type") == "timeseries"
        for target in panel.get("targets", [])
        if bucket in target.get("expr", "")
    ]
    assert latency, "no timeseries panel queries the request histogram"
    assert [title for title, target in latency if target.get("exemplar") is not True] == []
