"""Render the Grafana dashboard's panels from Prometheus, using the dashboard JSON's own queries.

The report and Grafana can never disagree: both read monitoring/grafana/dashboards/flaskapi.json.
Grafana's `$__rate_interval`, `$__interval` and `$__range` are replaced by concrete windows.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

from bench.harness.environment import ROOT

DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "flaskapi.json"


@dataclasses.dataclass
class Panel:
    title: str
    unit: str
    description: str
    targets: list[tuple[str, str, str]]  # (refId, expr, legendFormat)


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def flatten(items: list[dict]) -> list[dict]:
    """Every panel as Grafana stores it, those nested in (collapsed) rows included, rows not."""
    found = []
    for item in items:
        if item.get("type") == "row":
            found.extend(flatten(item.get("panels", [])))
        else:
            found.append(item)
    return found


def panels(dashboard: dict) -> list[Panel]:
    """Every panel with queries, in dashboard order."""
    found = []
    for item in flatten(dashboard.get("panels", [])):
        targets = [
            (t.get("refId", ""), t["expr"], t.get("legendFormat", "")) for t in item.get("targets", []) if t.get("expr")
        ]
        if targets:
            unit = item.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            found.append(Panel(item.get("title", ""), unit, item.get("description", ""), targets))
    return found


def annotation_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(a.get("name", ""), a["expr"]) for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]


# The dashboard's template variables as the report (one app host, the demo's jobs) fills them.
VARIABLES = {"job": "flaskapi", "instance": ".+"}


def substitute(
    expr: str, *, rate_interval: str, interval: str, range_: str, variables: dict[str, str] | None = None
) -> str:
    """Grafana's macros and the dashboard's variables (`$job` or `${job}`, used as `=~` regexes)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", interval).replace("$__range", range_)
    for name, value in {**VARIABLES, **(variables or {})}.items():
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", value, expr)
    return expr


def legend(template: str, labels: dict) -> str:
    if not template:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def render(
    prometheus,
    out_dir: Path,
    *,
    start: float,
    end: float,
    step: float = 2.0,
    rate_interval: str = "20s",
    marks: dict[str, float] | None = None,
) -> dict[str, dict[str, int]]:
    """One PNG per panel plus index.html; returns {panel title: {refId: number of series}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    dashboard = load()
    window = f"{max(1, int(end - start))}s"
    summary: dict[str, dict[str, int]] = {}
    sections = []
    for number, panel in enumerate(panels(dashboard), start=1):
        figure, axes = plt.subplots(figsize=(9, 3.2))
        counts = {}
        for ref, expr, legend_format in panel.targets:
            query = substitute(expr, rate_interval=rate_interval, interval=f"{int(step)}s", range_=window)
            series = prometheus.query_range(query, start, end, step)
            counts[ref] = len(series)
            for result in series:
                xs = [float(t) - start for t, _ in result["values"]]
                ys = [float(v) for _, v in result["values"]]
                axes.plot(xs, ys, label=legend(legend_format, result["metric"]))
        for name, at in (marks or {}).items():
            axes.axvline(at - start, color="red", linestyle="--", linewidth=1)
            axes.annotate(name, (at - start, 1), xycoords=("data", "axes fraction"), color="red", fontsize=8, va="top")
        axes.set_title(panel.title)
        axes.set_xlabel("seconds since start")
        axes.set_ylabel(panel.unit)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7, loc="upper left")
        figure.tight_layout()
        image = f"panel-{number:02d}.png"
        figure.savefig(out_dir / image, dpi=90)
        plt.close(figure)
        summary[panel.title] = counts
        queries = "".join(f"<li><code>{html.escape(expr)}</code></li>" for _, expr, _ in panel.targets)
        sections.append(
            f"<h2>{html.escape(panel.title)}</h2><p>{html.escape(panel.description)}</p>"
            f"<img src='{image}' alt='{html.escape(panel.title)}'><ul>{queries}</ul>"
        )
    (out_dir / "dashboard.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>flaskapi dashboard report</title>"
        f"<h1>{html.escape(dashboard.get('title', 'dashboard'))}</h1>" + "".join(sections)
    )
    return summary
