"""Reading the Grafana dashboard the way the monitoring tests ask about it: its rows, panels,
template variables and the selectors of its queries."""

from __future__ import annotations

import re

# The series the service exports (the app's, the master's, the standard process ones), the
# series Prometheus records from them (`flaskapi_slo:error_ratio:rate5m`: the colons of a
# recording rule) and the alerts it derives from its rules: every selector of one of them must
# follow the dashboard's job and instance variables, as far as the series carry the labels.
SERVICE_METRIC = re.compile(r"\b(?:flask_[a-z_]+|flaskapi_[a-z_]+(?::[a-z_0-9]+)*|process_[a-z_]+|ALERTS)\b")
JOB = 'job=~"$job"'
INSTANCE = re.compile(r'instance=~"\$instance\|?"')


def rows(board: dict) -> list[tuple[dict, list[dict]]]:
    """(row, the panels laid out under it) in dashboard order; rows are not collapsed, so their
    panels follow them at the top level of `panels`."""
    found: list[tuple[dict, list[dict]]] = []
    for item in board["panels"]:
        if item.get("type") == "row":
            found.append((item, []))
        elif found:
            found[-1][1].append(item)
    return found


def panel(board: dict, title: str) -> dict:
    (match,) = [p for p in board["panels"] if p.get("title") == title]
    return match


def target_expr(board: dict, title: str, ref: str = "A") -> str:
    (expr,) = [t["expr"] for t in panel(board, title)["targets"] if t["refId"] == ref]
    return expr


def variable(board: dict, name: str) -> dict:
    (match,) = [v for v in board["templating"]["list"] if v["name"] == name]
    return match


def variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def label_values(query: str) -> tuple[str, str]:
    """(selector, label) of Grafana's `label_values(selector, label)`: Grafana asks Prometheus for
    the series matching the selector (/api/v1/series) and lists that label's values."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert match, f"not a label_values query: {query}"
    return match.group(1).strip(), match.group(2)


def recorded(name: str) -> bool:
    """A recording rule's series: the SLO rules sum by job, so it has no instance to filter on."""
    return ":" in name


def unfiltered_selectors(expr: str) -> list[str]:
    """The selectors of service series in `expr` that do not filter on both `job=~"$job"` and
    `instance=~"$instance"` (or `"$instance|"`, which also keeps alerts without an instance); a
    recorded series on `job=~"$job"` alone."""
    bad = []
    for match in SERVICE_METRIC.finditer(expr):
        rest = expr[match.end() :]
        selector = re.match(r"\{([^}]*)\}", rest)
        matchers = selector.group(1) if selector else ""
        if JOB not in matchers or not (recorded(match.group(0)) or INSTANCE.search(matchers)):
            bad.append(match.group(0) + (selector.group(0) if selector else ""))
    return bad


# The exporters' series (Debian's node and Postgres exporters, monitoring/postgres-exporter/
# queries.yml): their targets carry the `host` they run on, which the Hosts and Database server
# rows follow, and the job of their exporter.
EXPORTER_METRIC = re.compile(r"(?<![\w:])(?:node|pg)_\w+")
EXPORTER_JOB = {"node": 'job="node"', "pg": 'job="postgres"'}
HOST = 'host=~"$host"'


def unfiltered_exporter_selectors(expr: str) -> list[str]:
    """The selectors of exporter series in `expr` without their job and `host=~"$host"`."""
    bad = []
    for match in EXPORTER_METRIC.finditer(expr):
        selector = re.match(r"\{([^}]*)\}", expr[match.end() :])
        matchers = selector.group(1) if selector else ""
        if EXPORTER_JOB[match.group(0).split("_")[0]] not in matchers or HOST not in matchers:
            bad.append(match.group(0) + (selector.group(0) if selector else ""))
    return bad
