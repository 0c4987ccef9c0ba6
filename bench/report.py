"""A Grafana dashboard rendered from Prometheus as one static page, with the dashboard JSON's own
queries, field config and annotation queries, so the report and Grafana cannot disagree.

What is read from Grafana's JSON model (schemaVersion 39):

- `panels`: rows (`type: row`, collapsed or not) become section headings; `gridPos` on the
  24-column grid becomes the page's CSS grid and each figure's size;
- every panel: `title`, `description`, `links`, `targets` (`expr`, `legendFormat`, `hide`,
  `format`), `fieldConfig.defaults` and `overrides` (byName, byRegexp, byFrameRefID): `unit`,
  `color`, `min`/`max`, `mappings`, `thresholds` with `custom.thresholdsStyle`, and for
  timeseries `custom.drawStyle` (line, bars, points), `custom.stacking`, `custom.lineStyle`,
  `custom.fillOpacity`, `custom.axisSoftMin`/`axisSoftMax`;
- `stat`/`gauge`/`bargauge`: `options.reduceOptions.calcs`, value mappings, threshold colours;
- `heatmap`: targets of cumulative `le` buckets (format "heatmap"), drawn as per-bucket rates;
- `state-timeline`/`status-history`/`table` (ALERTS): spans of each series over time;
- `annotations.list` entries with an `expr`: evaluated with query_range at their `step` (or the report's, if finer);
  consecutive points of a series are one region, a lone point an event (Grafana's rule);
- `templating.list` variables and Grafana's `$__` macros, substituted before Prometheus sees them.

Every figure shares one wall-clock UTC time axis (the run's start to end), values are shown in
people's units (ms, %, req/s, MiB), and a y axis starts at 0 for data that cannot go negative.

    python -m bench.report REPORT_DIR [--dashboard FILE]

renders a finished demo's report again, from the Prometheus data it kept (REPORT_DIR/tsdb).
With the run's logs/app.log beside it, the page also lists the exemplars of the latency
histogram's slowest buckets and the log lines of those requests (`slowest_exemplars`), and with
its sentry-events.json the run's Sentry events, each with the log lines of its trace.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime as dt
import html
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness.environment import ROOT

DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "flaskapi.json"
PAGE = "dashboard.html"
GRID_COLUMNS = 24
GRID_WIDTH_PX = 1560  # the panel grid at a 1600 px wide window
GRID_GAP_PX = 10
ROW_HEIGHT_PX = 30  # one gridPos height unit, as Grafana draws it
DPI = 100
# The files of a demo run the page links to when they are in its folder: (path, what it is).
RUN_FILES = (
    ("locust.html", "locust's report"),
    ("logs/app.log", "the service's log (JSON lines, UTC)"),
    ("central/app.log", "the same log as the log host received it (rsyslog over RELP, with its host)"),
    ("sentry-events.json", "the Sentry events of the run (as a local receiver got them)"),
    ("summary.json", "summary.json"),
    ("summary.md", "summary.md"),
    ("locust.out", "locust's output (its final table)"),
)


# --- the dashboard's JSON model ------------------------------------------------------------------


@dataclasses.dataclass
class Panel:
    title: str
    unit: str
    description: str
    targets: list[tuple[str, str, str]]  # (refId, expr, legendFormat)
    raw: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        """How the report draws it: timeseries, stat, heatmap or state."""
        return KINDS.get(self.raw.get("type", "timeseries"), "timeseries")


KINDS = {
    "stat": "stat",
    "gauge": "stat",
    "bargauge": "stat",
    "singlestat": "stat",
    "heatmap": "heatmap",
    "state-timeline": "state",
    "status-history": "state",
    "table": "state",
}


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def flatten(items: list[dict]) -> list[dict]:
    """Every panel as Grafana stores it, those nested in (collapsed) rows included, rows not."""
    found = []
    for item in items:
        if item.get("type") == "row":
            found.extend(flatten(item.get("panels", [])))
        else:
            found.append(item)
    return found


def _prometheus(datasource) -> bool:
    """A datasource reference that is (or may be, as `${datasource}`) Prometheus."""
    if isinstance(datasource, dict):
        return datasource.get("type", "prometheus") == "prometheus"
    return True


def panel_of(item: dict) -> Panel:
    targets = [
        (t.get("refId", ""), t["expr"], t.get("legendFormat", ""))
        for t in item.get("targets", [])
        if t.get("expr") and _prometheus(t.get("datasource", item.get("datasource")))
    ]
    unit = item.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    return Panel(item.get("title", ""), unit, item.get("description", ""), targets, item)


def panels(dashboard: dict) -> list[Panel]:
    """Every panel with Prometheus queries, in dashboard order."""
    return [panel for panel in map(panel_of, flatten(dashboard.get("panels", []))) if panel.targets]


def _position(item: dict) -> tuple[int, int]:
    grid = item.get("gridPos", {})
    return grid.get("y", 0), grid.get("x", 0)


def sections(dashboard: dict) -> list[tuple[dict | None, list[dict]]]:
    """The dashboard as Grafana lays it out: (row, or None before the first, its panels by position).
    An open row owns the panels below it up to the next row; a collapsed one keeps them inside."""
    found: list[tuple[dict | None, list[dict]]] = [(None, [])]
    for item in sorted(dashboard.get("panels", []), key=_position):
        if item.get("type") == "row":
            found.append((item, sorted(item.get("panels", []), key=_position)))
        else:
            found[-1][1].append(item)
    return [(row, items) for row, items in found if row is not None or items]


def annotation_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(a.get("name", ""), a["expr"]) for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]


# --- variables and macros ------------------------------------------------------------------------

# The dashboard's template variables as the report fills them (the demo's jobs, every instance
# and host); a variable not named here takes its saved value, or "All" (`allValue` or `.+`).
VARIABLES = {"job": "flaskapi", "instance": ".+", "host": ".+"}


def variables(dashboard: dict) -> dict[str, str]:
    """Every template variable's value for the report (datasource variables excluded)."""
    values = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        name = variable.get("name")
        if not name or variable.get("type") == "datasource":
            continue
        current = (variable.get("current") or {}).get("value")
        if isinstance(current, list):
            current = "|".join(current) if current and "$__all" not in current else None
        if current in (None, "", "$__all"):
            options = [o.get("value") for o in variable.get("options", []) if o.get("value") not in (None, "$__all")]
            if variable.get("includeAll") or variable.get("multi"):
                current = variable.get("allValue") or ".+"
            elif options:
                current = options[0]
            elif variable.get("type") in ("custom", "constant") and variable.get("query"):
                current = str(variable["query"]).split(",")[0].strip()
            else:
                current = ".+"
        values[name] = str(current)
    return {**values, **VARIABLES}


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Prometheus/Grafana duration ("15s", "1m30s", "500ms"); None when absent."""
    if not text:
        return None
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text).strip():
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


def grafana_rate_interval(step: float, scrape_interval: float) -> str:
    """Grafana's `$__rate_interval`: max($__interval + scrape interval, 4 x scrape interval)."""
    return f"{max(step + scrape_interval, 4 * scrape_interval):g}s"


def interpolate(text: str, values: dict[str, str]) -> str:
    """The dashboard's variables in `text` (`$job`, `${job}`, `${job:regex}`, `[[job]]`)."""
    for name, value in values.items():
        pattern = (
            r"\$\{" + re.escape(name) + r"(?::\w+)?\}|\$" + re.escape(name) + r"\b|\[\[" + re.escape(name) + r"\]\]"
        )
        text = re.sub(pattern, lambda _match, value=value: value, text)
    return text


def substitute(
    expr: str, *, rate_interval: str, interval: str, range_: str, variables: dict[str, str] | None = None
) -> str:
    """Grafana's macros (`$__rate_interval`, `$__interval[_ms]`, `$__range[_s|_ms]`) and the
    dashboard's variables (VARIABLES, then `variables`), as Grafana sends the query."""
    macros = {
        "rate_interval": rate_interval,
        "interval": interval,
        "interval_ms": f"{parse_duration(interval) * 1000:g}",
        "range": range_,
        "range_s": f"{parse_duration(range_):g}",
        "range_ms": f"{parse_duration(range_) * 1000:g}",
    }
    expr = re.sub(r"\$\{?__(\w+)\}?", lambda m: macros.get(m.group(1), m.group(0)), expr)
    return interpolate(expr, {**VARIABLES, **(variables or {})})


def legend(template: str, labels: dict) -> str:
    """A series' name from its legendFormat (`{{method}} {{route}}`), or its labels without one."""
    if not template or template == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


# --- field config: overrides, colours, thresholds, mappings --------------------------------------


def field_config(panel: dict, name: str, ref: str = "") -> dict:
    """fieldConfig.defaults with the overrides whose matcher takes this field, applied in order
    (a later property wins), as Grafana resolves a field's config."""
    config = copy.deepcopy(panel.get("fieldConfig", {}).get("defaults", {}))
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        kind, option = matcher.get("id"), matcher.get("options")
        matches = (
            (kind == "byName" and option == name)
            or (kind == "byFrameRefID" and option == ref)
            or (kind == "byRegexp" and isinstance(option, str) and re.search(option.strip("/"), name) is not None)
            or (kind == "byNames" and isinstance(option, dict) and name in option.get("names", []))
        )
        if matches:
            for prop in override.get("properties", []):
                keys = prop.get("id", "").split(".")
                node = config
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = prop.get("value")
    return config


# Grafana's palette-classic and named colours (the base, dark-, semi-dark-, light- shades).
PALETTE = ("#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0", "#37872D")
NAMED_COLORS = {
    "green": "#73BF69",
    "dark-green": "#37872D",
    "semi-dark-green": "#56A64B",
    "light-green": "#96D98D",
    "red": "#F2495C",
    "dark-red": "#C4162A",
    "semi-dark-red": "#E02F44",
    "light-red": "#FF7383",
    "orange": "#FF9830",
    "dark-orange": "#FA6400",
    "semi-dark-orange": "#FF780A",
    "light-orange": "#FFB357",
    "yellow": "#FADE2A",
    "dark-yellow": "#E0B400",
    "semi-dark-yellow": "#F2CC0C",
    "light-yellow": "#FFEE52",
    "blue": "#5794F2",
    "dark-blue": "#1F60C4",
    "semi-dark-blue": "#3274D9",
    "light-blue": "#8AB8FF",
    "purple": "#B877D9",
    "dark-purple": "#8F3BB8",
    "semi-dark-purple": "#A352CC",
    "light-purple": "#CA95E5",
    "text": "#464C54",
    "transparent": "#00000000",
}


def color(name: str | None, fallback: str = "#808080") -> str:
    """A Grafana colour (named, #hex or rgba(...)) as #rrggbb[aa], which matplotlib and CSS read."""
    if not name:
        return fallback
    name = str(name).strip()
    if name in NAMED_COLORS:
        return NAMED_COLORS[name]
    base = re.sub(r"^(super-light|light|semi-dark|dark)-", "", name)
    if base in NAMED_COLORS:
        return NAMED_COLORS[base]
    if re.fullmatch(r"#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?", name):
        return name
    match = re.fullmatch(r"rgba?\(([^)]*)\)", name)
    if match:
        parts = [float(p) for p in match.group(1).split(",")]
        alpha = parts[3] if len(parts) > 3 else 1.0
        return "#{:02x}{:02x}{:02x}{:02x}".format(*(int(p) for p in parts[:3]), int(alpha * 255))
    return fallback


def series_color(config: dict, index: int) -> str:
    """A series' colour: a fixed colour when its config says so, else the palette's next."""
    mode = config.get("color", {}) or {}
    if mode.get("mode") in ("fixed", "shades") and mode.get("fixedColor"):
        return color(mode["fixedColor"], PALETTE[index % len(PALETTE)])
    return PALETTE[index % len(PALETTE)]


def threshold_steps(config: dict) -> list[tuple[float | None, str]]:
    """(value, colour) of each absolute threshold step; the base step has value None."""
    thresholds = config.get("thresholds") or {}
    if thresholds.get("mode", "absolute") != "absolute":
        return []
    return [(step.get("value"), color(step.get("color"))) for step in thresholds.get("steps", [])]


def threshold_color(config: dict, value: float) -> str | None:
    found = None
    for limit, shade in threshold_steps(config):
        if limit is None or (math.isfinite(value) and value >= limit):
            found = shade
    return found


def drawn_thresholds(config: dict) -> list[tuple[float, str, str]]:
    """(value, colour, matplotlib line style) of the threshold lines this field asks for: numeric
    steps, when custom.thresholdsStyle.mode is not "off" (Grafana's default)."""
    mode = ((config.get("custom") or {}).get("thresholdsStyle") or {}).get("mode", "off")
    if mode == "off":
        return []
    style = "--" if mode.startswith("dashed") else "-"
    return [(limit, shade, style) for limit, shade in threshold_steps(config) if isinstance(limit, (int, float))]


def mapping(config: dict, value: float) -> tuple[str | None, str | None] | None:
    """(text, colour) of the first value mapping that takes `value` (value, range, special)."""
    for entry in config.get("mappings", []) or []:
        kind, options = entry.get("type"), entry.get("options", {}) or {}
        result = None
        if kind == "value":
            for key, candidate in options.items():
                try:
                    if float(key) == value:
                        result = candidate
                        break
                except ValueError:
                    continue
        elif kind == "range" and math.isfinite(value):
            low, high = options.get("from"), options.get("to")
            if (low is None or value >= low) and (high is None or value <= high):
                result = options.get("result", {})
        elif kind == "special" and not math.isfinite(value) and options.get("match") in ("nan", "null", "null+nan"):
            result = options.get("result", {})
        if result is not None:
            return result.get("text"), color(result.get("color"), None) if result.get("color") else None
    return None


# --- units -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scale:
    """How values of a Grafana unit are shown: multiplied by `factor`, followed by `label`."""

    factor: float
    label: str


TIME_UNITS = {"s": 1000.0, "ms": 1.0, "µs": 0.001, "us": 0.001, "ns": 1e-6}
RATE_UNITS = {
    "reqps": "req/s",
    "rps": "reads/s",
    "wps": "writes/s",
    "iops": "I/O ops/s",
    "ops": "ops/s",
    "cps": "/s",
    "hertz": "/s",
    "cpm": "/min",
    "opm": "ops/min",
    "rpm": "reads/min",
    "wpm": "writes/min",
}
PERCENT_UNITS = {"percentunit": 100.0, "percent": 1.0}
BYTE_UNITS = {  # unit id: (bytes in one, base, prefixes)
    "bytes": (1, 1024, ("B", "KiB", "MiB", "GiB", "TiB")),
    "kbytes": (1024, 1024, ("B", "KiB", "MiB", "GiB", "TiB")),
    "mbytes": (1024**2, 1024, ("B", "KiB", "MiB", "GiB", "TiB")),
    "decbytes": (1, 1000, ("B", "kB", "MB", "GB", "TB")),
    "binBps": (1, 1024, ("B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s")),
}
COUNT_UNITS = {"", "none", "short", "count", "locale", "sishort", "string"}


def scale(unit: str, values: Sequence[float] = ()) -> Scale:
    """The scale of a Grafana unit id for these values: latency in ms, ratios in %, rates per
    second, bytes in the binary prefix that fits the largest value, counts plain."""
    unit = unit or ""
    if unit in TIME_UNITS:
        return Scale(TIME_UNITS[unit], "ms")
    if unit in PERCENT_UNITS:
        return Scale(PERCENT_UNITS[unit], "%")
    if unit in RATE_UNITS:
        return Scale(1.0, RATE_UNITS[unit])
    if unit in BYTE_UNITS:
        one, base, prefixes = BYTE_UNITS[unit]
        largest = max((abs(v) * one for v in values if math.isfinite(v)), default=0.0)
        power = 0
        while power < len(prefixes) - 1 and largest >= base ** (power + 1):
            power += 1
        return Scale(one / base**power, prefixes[power])
    if unit in COUNT_UNITS:
        return Scale(1.0, "")
    if unit.startswith("suffix:"):
        return Scale(1.0, unit.split(":", 1)[1])
    return Scale(1.0, unit)


def number(value: float) -> str:
    """A figure for people: whole numbers with thousands separators, others to 0.1 (two
    significant digits below 1)."""
    if not math.isfinite(value):
        return "n/a"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.1f}"
    return f"{value:.2g}"


def format_value(value: float, unit: str) -> str:
    """One value with its unit for people: 0.0123 s is "12.3 ms", 0.15 percentunit "15%"."""
    shown = scale(unit, [value])
    text = number(value * shown.factor)
    if not shown.label or not math.isfinite(value):
        return text
    return f"{text}{shown.label}" if shown.label in ("%", "/s", "/min") else f"{text} {shown.label}"


def y_limits(values: Sequence[float], marks: Sequence[float] = (), *, soft_min=None, soft_max=None) -> tuple:
    """The y range: from 0 for data that is never negative (so an all-zero panel is 0..1, never
    below 0), with a margin above the largest value and any threshold in `marks`."""
    finite = [v for v in values if math.isfinite(v)]
    reach = finite + [m for m in marks if math.isfinite(m)]
    reach += [v for v in (soft_min, soft_max) if v is not None]
    if not reach:
        return 0.0, 1.0
    lowest, highest = min(reach), max(reach)
    low = 0.0 if lowest >= 0 else lowest * 1.1
    high = highest * 1.1 if highest > 0 else 0.0
    if high <= low:
        high = low + 1.0
    return low, high


# --- annotations ----------------------------------------------------------------------------------


def spans(times: Sequence[float], step: float) -> list[tuple[float, float]]:
    """Grafana's rule for a Prometheus annotation: points at most one step apart are one region
    (first point to last), a point alone is an event (start == end)."""
    found: list[list[float]] = []
    for at in sorted(times):
        if found and at - found[-1][1] <= step * 1.001:
            found[-1][1] = at
        else:
            found.append([at, at])
    return [(start, end) for start, end in found]


@dataclasses.dataclass
class Annotation:
    name: str  # the dashboard's annotation query
    color: str
    title: str
    text: str
    start: float
    end: float

    @property
    def is_event(self) -> bool:
        return self.start == self.end


def aligned(start: float, step: float) -> float:
    """A range query's start as Grafana sends it: a multiple of the step."""
    return math.floor(start / step) * step


def annotation_queries(dashboard: dict, values: dict, *, step: float, macros: dict) -> list[tuple[dict, str, float]]:
    """(entry, query as sent, step) of each enabled Prometheus annotation query: its own `step`,
    or the report's when that is finer (the dashboard writes its annotation queries for any step,
    and a short run scraped every 2 s places a death 2 s after it, not 5); `$__interval` is that
    step, as Grafana sends annotation queries."""
    found = []
    for entry in dashboard.get("annotations", {}).get("list", []):
        if entry.get("expr") and entry.get("enable") is not False and _prometheus(entry.get("datasource")):
            every = min(parse_duration(entry.get("step")) or step, step)
            query = substitute(entry["expr"], **{**macros, "interval": f"{every:g}s"}, variables=values)
            found.append((entry, query, every))
    return found


def annotations(prometheus, dashboard: dict, values: dict, *, start: float, end: float, step: float, macros: dict):
    """The dashboard's annotation queries over [start, end], each at its step with the start
    aligned to it (as Grafana sends them), as events and regions named by titleFormat/textFormat."""
    found = []
    for entry, query, every in annotation_queries(dashboard, values, step=step, macros=macros):
        for series in prometheus.query_range(query, aligned(start, every), end, every):
            labels = series["metric"]
            if entry.get("useValueForTime"):
                times = sorted({float(v) / 1000 for _, v in series["values"]})
                found_spans = [(t, t) for t in times]
            else:
                found_spans = spans([float(t) for t, _ in series["values"]], every)
            for first, last in found_spans:
                if last < start or first > end:
                    continue
                found.append(
                    Annotation(
                        name=entry.get("name", ""),
                        color=color(entry.get("iconColor"), "#F2495C"),
                        title=legend(entry.get("titleFormat") or entry.get("name", ""), labels),
                        text=legend(entry.get("textFormat", ""), labels) if entry.get("textFormat") else "",
                        start=max(first, start),
                        end=min(last, end),
                    )
                )
    return sorted(found, key=lambda a: a.start)


# --- data -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Series:
    ref: str
    name: str
    labels: dict
    values: list[float]  # on the panel's time grid, NaN where Prometheus had no point
    config: dict


def on_grid(points: list, grid: list[float]) -> list[float]:
    """A range result's [time, "value"] pairs placed on the time grid, NaN where it has none."""
    by_time = {round(float(t), 3): float(v) for t, v in points}
    return [by_time.get(round(t, 3), math.nan) for t in grid]


def utc(at: float, pattern: str = "%H:%M:%S") -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime(pattern)


def utc_full(at: float) -> str:
    return utc(at, "%Y-%m-%d %H:%M:%S UTC")


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


# --- figures ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Frame:
    """What every figure of one report shares: the time axis and the query grid."""

    start: float
    end: float
    step: float
    grid: list[float]
    annotations: list[Annotation]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def figure_size(item: dict, extra_height: float = 0.0) -> tuple[float, float]:
    """Inches for a panel at its gridPos size on the page (1 px = 1/DPI in): as wide as its
    columns, about as high as Grafana draws its rows, less the card's title and description."""
    grid = item.get("gridPos", {})
    columns, rows = grid.get("w", 12), grid.get("h", 8)
    column_px = (GRID_WIDTH_PX - (GRID_COLUMNS - 1) * GRID_GAP_PX) / GRID_COLUMNS
    width_px = columns * column_px + (columns - 1) * GRID_GAP_PX - 22
    height_px = max(150.0, rows * ROW_HEIGHT_PX - 30)
    return max(2.4, width_px / DPI), height_px / DPI + extra_height


# Tick spacings on the time axis, in seconds: wall-clock multiples a reader expects.
TICK_SECONDS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def tick_seconds(span: float, width_in: float) -> int:
    """The smallest spacing that puts at most about one tick per inch on the axis."""
    most = max(2, int(width_in * 1.1))
    return next((s for s in TICK_SECONDS if span / s <= most), TICK_SECONDS[-1])


def _time_axis(axes, frame: Frame, width_in: float) -> None:
    """The shared x axis: the run's start to end, HH:MM:SS UTC ticks on round wall-clock times."""
    import matplotlib.dates as mdates
    from matplotlib.ticker import MultipleLocator

    axes.set_xlim(_x(frame.start), _x(frame.end))
    axes.xaxis.set_major_locator(MultipleLocator(tick_seconds(frame.end - frame.start, width_in) / 86400))
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=dt.UTC))
    axes.tick_params(axis="x", labelsize=7)
    axes.set_xlabel("UTC", fontsize=6.5, loc="right", labelpad=1, color="#57606a")


def time_limits(figure) -> list[list[float]]:
    """The x range of each of the figure's time axes, in seconds since the epoch."""
    import matplotlib.dates as mdates

    return [
        [mdates.num2date(limit).timestamp() for limit in axes.get_xlim()]
        for axes in figure.axes
        if isinstance(axes.xaxis.get_major_formatter(), mdates.DateFormatter)
    ]


def _x(at: float) -> float:
    """Seconds since the epoch as matplotlib's date numbers (days, UTC)."""
    import matplotlib.dates as mdates

    return mdates.date2num(dt.datetime.fromtimestamp(at, dt.UTC))


def _draw_annotations(axes, frame: Frame, *, labels: bool = True) -> None:
    """Events as vertical lines, regions shaded, each labelled with its title at the top of the
    axes (one under the other, so marks at the same time stay readable; the text is in the
    page's list). Labels are clipped to the axes and never shrink the plot."""
    for index, note in enumerate(frame.annotations):
        if note.is_event:
            axes.axvline(_x(note.start), color=note.color, linewidth=1.2, linestyle=(0, (4, 2)), zorder=5)
        else:
            axes.axvspan(_x(note.start), _x(note.end), color=note.color, alpha=0.12, linewidth=0, zorder=0)
        if not labels:
            continue
        text = axes.annotate(
            note.title,
            (_x(note.start), 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2 - 8 * (index % 3)),
            textcoords="offset points",
            color=note.color,
            fontsize=6.5,
            va="top",
            annotation_clip=True,
            clip_on=True,
        )
        text.set_in_layout(False)


def legend_columns(names: Sequence[str], width_in: float) -> int:
    """As many legend columns as the longest name leaves room for (7 pt text, a swatch)."""
    if not names:
        return 1
    return max(1, min(len(names), int(width_in * DPI // (max(map(len, names)) * 5.6 + 42))))


def _legend(figure, axes) -> None:
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        columns = legend_columns(labels, figure.get_figwidth())
        figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=7, frameon=False)


def _reduce(values: list[float], calc: str) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if calc in ("last", "first"):
        chosen = values[-1] if calc == "last" else values[0]
        return chosen if values else math.nan
    if not finite:
        return math.nan
    reducers = {
        "lastNotNull": lambda: finite[-1],
        "firstNotNull": lambda: finite[0],
        "min": lambda: min(finite),
        "max": lambda: max(finite),
        "mean": lambda: sum(finite) / len(finite),
        "sum": lambda: sum(finite),
        "count": lambda: float(len(finite)),
        "range": lambda: max(finite) - min(finite),
        "diff": lambda: finite[-1] - finite[0],
        "delta": lambda: finite[-1] - finite[0],
    }
    return reducers.get(calc, reducers["lastNotNull"])()


def display(config: dict, value: float, unit: str) -> tuple[str, str | None]:
    """A value as a stat shows it: its mapping's text and colour, else the value in its unit
    with its threshold colour."""
    mapped = mapping(config, value)
    if mapped is not None:
        text, shade = mapped
        return text if text else format_value(value, unit), shade or threshold_color(config, value)
    return (format_value(value, unit) if math.isfinite(value) else "No data"), threshold_color(config, value)


def stat_note(series: Series, unit: str, step: float, calc: str) -> str:
    """What the big value hides: how long the series spent at its minimum when that reads
    differently ("DOWN for 12 s"), and how long there was no data."""
    finite = [v for v in series.values if math.isfinite(v)]
    if not finite:
        return "no data over the run"
    shown, _ = display(series.config, _reduce(series.values, calc), unit)
    low, _ = display(series.config, min(finite), unit)
    texts = [display(series.config, v, unit)[0] for v in finite]
    notes = []
    if low != shown:
        notes.append(f"{low} for {seconds(texts.count(low) * step)} (min over the run)")
    elif all(text == shown for text in texts):
        notes.append(f"{shown} throughout the run")
    else:
        notes.append(f"min {low}")
    missing = len(series.values) - len(finite)
    if missing:
        notes.append(f"no data for {seconds(missing * step)}")
    return "; ".join(notes)


def draw_timeseries(plt, item: dict, panel: Panel, series: list[Series], frame: Frame) -> dict:
    width, _ = figure_size(item)
    names = [one.name for one in series]
    width, height = figure_size(item, extra_height=0.16 * math.ceil(len(names) / legend_columns(names, width)))
    figure = plt.figure(figsize=(width, height), layout="constrained", dpi=DPI)
    axes = figure.add_subplot()
    all_values = [v for s in series for v in s.values]
    shown = scale(panel.unit, all_values)
    xs = [_x(t) for t in frame.grid]
    stacks: dict[str, list[float]] = {}
    styles = {}
    drawn: list[float] = []
    for index, one in enumerate(series):
        custom = one.config.get("custom", {}) or {}
        shade = series_color(one.config, index)
        ys = [v * shown.factor for v in one.values]
        base = [0.0] * len(ys)
        stacking = custom.get("stacking") or {}
        if stacking.get("mode") == "normal":
            group = stacking.get("group", "A")
            base = stacks.get(group, [0.0] * len(ys))
            ys = [b + (0.0 if math.isnan(y) else y) for b, y in zip(base, ys, strict=True)]
            stacks[group] = ys
        drawn.extend(ys)
        fill = float(custom.get("fillOpacity", 0) or 0) / 100
        style = styles[one.name] = custom.get("drawStyle", "line")
        if style == "bars":
            heights = [0.0 if math.isnan(y) else y - b for y, b in zip(ys, base, strict=True)]
            axes.bar(xs, heights, bottom=base, width=frame.step / 86400 * 0.9, color=shade, alpha=max(fill, 0.6))
            axes.plot([], [], color=shade, linewidth=6, label=one.name)
        elif style == "points":
            axes.plot(xs, ys, "o", markersize=2.5, color=shade, label=one.name)
        else:
            dash = (custom.get("lineStyle") or {}).get("fill") in ("dash", "dot")
            axes.plot(
                xs,
                ys,
                color=shade,
                linewidth=float(custom.get("lineWidth", 1) or 1) * 0.8,
                linestyle="--" if dash else "-",
                label=one.name,
            )
            if fill:
                axes.fill_between(xs, base, ys, color=shade, alpha=fill, linewidth=0)
    lines = {}
    for one in series or [Series("", "", {}, [], field_config(item, ""))]:
        for limit, shade, style in drawn_thresholds(one.config):
            lines.setdefault(limit, (shade, style))
    for limit, (shade, style) in lines.items():
        axes.axhline(limit * shown.factor, color=shade, linestyle=style, linewidth=1)
        label = axes.annotate(  # at the left end, away from the annotation labels along the top
            f"threshold {format_value(limit, panel.unit)}",
            (0.0, limit * shown.factor),
            xycoords=("axes fraction", "data"),
            xytext=(3, 2),
            textcoords="offset points",
            ha="left",
            va="bottom",
            fontsize=6.5,
            color=shade,
        )
        label.set_in_layout(False)
    defaults = item.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {}) or {}
    soft_min, soft_max = (
        None if v is None else v * shown.factor for v in (custom.get("axisSoftMin"), custom.get("axisSoftMax"))
    )
    low, high = y_limits(drawn, [limit * shown.factor for limit in lines], soft_min=soft_min, soft_max=soft_max)
    if defaults.get("min") is not None:
        low = defaults["min"] * shown.factor
    if defaults.get("max") is not None:
        high = defaults["max"] * shown.factor
    axes.set_ylim(low, high)
    if not shown.label and all(v == int(v) for v in drawn if math.isfinite(v)):
        from matplotlib.ticker import MaxNLocator

        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(shown.label)
    axes.grid(True, color="#e6e6e6", linewidth=0.6)
    _time_axis(axes, frame, width)
    _draw_annotations(axes, frame)
    if not series:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", color="#888")
    _legend(figure, axes)
    return {
        "figure": figure,
        "ylim": [low, high],
        "thresholds": sorted(lines),
        "unit": shown.label,
        "note": "",
        "styles": styles,
    }


def draw_stat(plt, item: dict, panel: Panel, series: list[Series], frame: Frame) -> dict:
    """The big value (reduced as the panel says, mapped, coloured) over a strip of the run on
    the shared time axis, coloured as the value was at each step."""
    width, height = figure_size(item)
    figure = plt.figure(figsize=(width, height), layout="constrained", dpi=DPI)
    options = item.get("options", {}) or {}
    calc = ((options.get("reduceOptions") or {}).get("calcs") or ["lastNotNull"])[0]
    color_mode = options.get("colorMode", "value")
    count = max(1, len(series))
    grid = figure.add_gridspec(2, count, height_ratios=[4, 1])
    notes = []
    for index, one in enumerate(series or [Series("", "", {}, [math.nan] * len(frame.grid), field_config(item, ""))]):
        text, shade = display(one.config, _reduce(one.values, calc), panel.unit)
        shade = shade or series_color(one.config, index)
        box = figure.add_subplot(grid[0, index])
        box.set_axis_off()
        if color_mode == "background":
            box.add_patch(plt.Rectangle((0, 0), 1, 1, transform=box.transAxes, color=shade, zorder=0))
        box.text(
            0.5,
            0.5,
            text,
            transform=box.transAxes,
            ha="center",
            va="center",
            fontsize=34,
            weight="bold",
            color="white" if color_mode == "background" else shade,
        )
        if one.name and (options.get("textMode") in ("value_and_name", "name") or len(series) > 1):
            box.text(
                0.5,
                0.88,
                one.name,
                transform=box.transAxes,
                ha="center",
                va="top",
                fontsize=8,
                color="white" if color_mode == "background" else "#444",
            )
        note = stat_note(one, panel.unit, frame.step, calc)
        notes.append(f"{one.name}: {note}" if len(series) > 1 else note)
        strip = figure.add_subplot(grid[1, index])
        for at, value in zip(frame.grid, one.values, strict=True):
            if math.isfinite(value):
                piece = display(one.config, value, panel.unit)[1] or series_color(one.config, index)
                strip.axvspan(_x(at - frame.step / 2), _x(at + frame.step / 2), color=piece, linewidth=0)
        strip.set_yticks([])
        strip.spines["left"].set_visible(False)
        _time_axis(strip, frame, width / count)
        _draw_annotations(strip, frame, labels=False)
    return {"figure": figure, "ylim": None, "thresholds": [], "unit": scale(panel.unit).label, "note": "; ".join(notes)}


def draw_heatmap(plt, item: dict, panel: Panel, series: list[Series], frame: Frame) -> dict:
    """Cumulative `le` buckets made per-bucket (each minus the one below), one row per bucket."""
    import numpy as np

    width, height = figure_size(item)
    figure = plt.figure(figsize=(width, height), layout="constrained", dpi=DPI)
    axes = figure.add_subplot()
    buckets: dict[float, list[float]] = {}
    for one in series:
        bound = float(one.labels.get("le", "nan"))
        if math.isnan(bound):
            continue
        row = buckets.setdefault(bound, [0.0] * len(frame.grid))
        for i, value in enumerate(one.values):
            row[i] += 0.0 if math.isnan(value) else value
    bounds = sorted(buckets)
    rows, below = [], [0.0] * len(frame.grid)
    for bound in bounds:
        rows.append([max(0.0, c - b) for c, b in zip(buckets[bound], below, strict=True)])
        below = buckets[bound]
    options = item.get("options", {}) or {}
    unit = (options.get("yAxis") or {}).get("unit") or panel.unit
    edges = [_x(t - frame.step / 2) for t in frame.grid] + [_x(frame.grid[-1] + frame.step / 2)] if frame.grid else []
    if rows and edges:
        empty = np.ma.masked_equal(np.array(rows), 0.0)  # no observations: the background, not a colour
        mesh = axes.pcolormesh(edges, list(range(len(bounds) + 1)), empty, cmap="YlOrRd", shading="flat")
        cell_unit = (options.get("cellValues") or {}).get("unit", "")
        bar = figure.colorbar(mesh, ax=axes, pad=0.01, fraction=0.04)
        rates = any("rate(" in expr for _, expr, _ in panel.targets)
        bar.set_label(scale(cell_unit).label or ("per second" if rates else ""), fontsize=7)
        bar.ax.tick_params(labelsize=6.5)
        every = max(1, math.ceil(len(bounds) / max(3, int(height * 4))))
        ticks = list(range(0, len(bounds), every))
        axes.set_yticks([i + 0.5 for i in ticks])
        axes.set_yticklabels(
            [
                ("> " + format_value(bounds[i - 1], unit))
                if math.isinf(bounds[i])
                else "≤ " + format_value(bounds[i], unit)
                for i in ticks
            ],
            fontsize=6.5,
        )
    else:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", color="#888")
    _time_axis(axes, frame, width)
    _draw_annotations(axes, frame)
    return {
        "figure": figure,
        "ylim": None,
        "thresholds": [],
        "unit": scale(unit).label,
        "note": f"{len(bounds)} buckets",
    }


STATE_COLORS = {"firing": "#E02F44", "pending": "#FF9830", "inactive": "#73BF69"}


def state_rows(panel: Panel, series: list[Series], frame: Frame) -> list[dict]:
    """Each series' spans over the run: consecutive steps showing the same thing are one span
    (an ALERTS series is there while the alert is pending or firing)."""
    rows = []
    for index, one in enumerate(series):
        state = one.labels.get("alertstate")
        name = one.name
        if name == legend("", one.labels) and "alertname" in one.labels:  # no legendFormat: the alert's name
            name = one.labels["alertname"] + ("" if state in (None, "firing") else f" ({state})")
        points = [(t, v) for t, v in zip(frame.grid, one.values, strict=True) if math.isfinite(v)]
        pieces: list[dict] = []
        for at, value in points:
            text, shade = display(one.config, value, panel.unit)
            shade = STATE_COLORS.get(state) or shade or series_color(one.config, index)
            last = pieces[-1] if pieces else None
            if last and last["text"] == text and at - last["end"] <= frame.step * 1.001:
                last["end"] = at
            else:
                pieces.append({"text": text, "color": shade, "start": at, "end": at})
        for piece in pieces:
            rows.append({"row": name, "state": state, **piece})
    return rows


def draw_state(plt, item: dict, panel: Panel, series: list[Series], frame: Frame) -> dict:
    width, height = figure_size(item)
    figure = plt.figure(figsize=(width, height), layout="constrained", dpi=DPI)
    axes = figure.add_subplot()
    rows = state_rows(panel, series, frame)
    names = list(dict.fromkeys(row["row"] for row in rows))
    for row in rows:
        y = names.index(row["row"])
        left, right = _x(row["start"] - frame.step / 2), _x(row["end"] + frame.step / 2)
        axes.broken_barh([(left, right - left)], (y - 0.35, 0.7), color=row["color"])
    axes.set_yticks(range(len(names)))
    axes.set_yticklabels(names, fontsize=7)
    axes.set_ylim(-0.7, max(len(names), 1) - 0.3)
    if not names:
        alerts = any("ALERTS" in expr for _, expr, _ in panel.targets)
        axes.set_yticks([])
        axes.text(
            0.5,
            0.5,
            "nothing in this range" + (" (no alert fired)" if alerts else ""),
            transform=axes.transAxes,
            ha="center",
            color="#555",
        )
    axes.grid(True, axis="x", color="#e6e6e6", linewidth=0.6)
    axes.set_axisbelow(True)
    _time_axis(axes, frame, width)
    _draw_annotations(axes, frame)
    return {"figure": figure, "ylim": None, "thresholds": [], "unit": "", "note": "", "spans": rows}


DRAW = {"timeseries": draw_timeseries, "stat": draw_stat, "heatmap": draw_heatmap, "state": draw_state}


def query_panel(prometheus, item: dict, panel: Panel, frame: Frame, macros: dict, values: dict) -> tuple:
    """The panel's visible targets through Prometheus: (series on the grid, {refId: count},
    [(refId, the query as sent)])."""
    found, counts, sent = [], {}, []
    hidden = {t.get("refId", "") for t in item.get("targets", []) if t.get("hide")}
    for ref, expr, legend_format in panel.targets:
        if ref in hidden:
            continue
        query = substitute(expr, **macros, variables=values)
        sent.append((ref, query))
        result = prometheus.query_range(query, frame.grid[0], frame.grid[-1], frame.step)
        counts[ref] = len(result)
        for one in result:
            name = interpolate(legend(legend_format, one["metric"]), values)
            config = field_config(item, name, ref)
            name = config.get("displayName") or name
            found.append(Series(ref, name, one["metric"], on_grid(one["values"], frame.grid), config))
    return found, counts, sent


# --- the page ---------------------------------------------------------------------------------------

CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;background:#f3f4f6}
header,main{max-width:1600px;margin:0 auto;padding:16px 20px}
header{background:#fff;border-bottom:1px solid #d8dee4;max-width:none}
header>div{max-width:1560px;margin:0 auto}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:22px 0 8px;padding-bottom:4px;border-bottom:2px solid #d8dee4}
h3{font-size:14px;margin:0 0 2px}
.range{font-size:15px;font-weight:600}
.muted,.description{color:#57606a}
.description{font-size:12.5px;margin:0 0 6px}
nav a{margin-right:14px}
a{color:#0969da}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:24px}
.card span{color:#57606a;font-size:12.5px}
.pass{color:#1a7f37}.fail{color:#cf222e}
.card.pass{border-color:#1a7f37}.card.fail{border-color:#cf222e}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d8dee4;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#f6f8fa}
td:first-child,th:first-child,td.text,th.text{text-align:left}
td.text{white-space:normal}
.two{display:grid;grid-template-columns:1fr 1fr;gap:20px}
.two>div{min-width:0}
.grid{display:grid;grid-template-columns:repeat(24,minmax(0,1fr));gap:10px;align-items:start}
.panel{background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:8px 10px;min-width:0}
.panel img{width:100%;height:auto;display:block}
.panel .note{font-size:12.5px;margin:4px 0}
details{font-size:12px;margin-top:4px}
details code{display:block;white-space:pre-wrap;word-break:break-all;background:#f6f8fa;padding:4px 6px;margin:3px 0}
.links a{font-size:12.5px;margin-right:10px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:baseline}
ul{margin:4px 0 8px;padding-left:20px}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _table(head: Sequence[str], rows: Sequence[Sequence], text_columns: int = 1) -> str:
    """An HTML table: the first `text_columns` columns text (left, wrapping), the others figures;
    a cell given as (text, css class) carries that class (pass, fail); no header row if `head` is
    all blank."""

    def cell(tag: str, index: int, value) -> str:
        text, css = value if isinstance(value, tuple) else (value, "")
        css = " ".join(c for c in ("text" if index < text_columns else "", css) if c)
        return f"<{tag}{f' class={css!r}' if css else ''}>{_e(text)}</{tag}>"

    header = f"<tr>{''.join(cell('th', i, h) for i, h in enumerate(head))}</tr>" if any(head) else ""
    body = "".join(f"<tr>{''.join(cell('td', i, c) for i, c in enumerate(row))}</tr>" for row in rows)
    return f"<table>{header}{body}</table>"


def _links(links: list[dict], values: dict, start: float, end: float) -> str:
    """Dashboard or panel links, their variables and `${__url_time_range}` filled."""
    found = []
    for link in links or []:
        url = link.get("url")
        if not url:
            continue
        url = url.replace("${__url_time_range}", f"from={int(start * 1000)}&to={int(end * 1000)}")
        url = re.sub(r"\$\{__[^}]*\}", "", interpolate(url, values))
        title = interpolate(link.get("title") or url, values)
        found.append(f"<a href='{_e(url)}'>{_e(title)}</a>")
    return " ".join(found)


def headline(summary: dict) -> str:
    """The run on top of the page: its verdict and numbers, from summary.json (bench/demo.py)."""
    run, counts, locust = summary["run"], summary["counts"], summary["locust"]
    verdict = summary["verdict"]
    cards = [
        (verdict.upper(), "SLO verdict", verdict),
        (number(locust["requests"]), f"requests sent (locust), {number(locust['rps'])} req/s", ""),
        (number(locust["failures"]), f"failures, {number(locust['unanswered'])} never answered", ""),
        (number(counts["server"]), "requests the server counted", ""),
        (number(counts["log"]), "access lines in logs/app.log", ""),
        (number(summary["server"]["worker_restarts"]), "worker restarts observed", ""),
        (number(len(summary["alerts"])), "alerts fired", ""),
    ]
    notifications = summary.get("notifications", [])
    waits = summary["run"].get("alertmanager")
    if waits is not None:
        cards.append((number(len(notifications)), "notifications delivered", ""))
    parts = ["<section><div class=cards>"]
    parts += [
        f"<div class='card {cls}'><b class='{cls}'>{_e(big)}</b><span>{_e(small)}</span></div>"
        for big, small, cls in cards
    ]
    parts.append("</div><h2>Requests by endpoint</h2>")
    parts.append(
        _table(
            [
                "endpoint",
                "locust requests",
                "failures",
                "never answered",
                "server counted",
                "access lines",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "req/s",
            ],
            [
                [
                    e["endpoint"],
                    number(e["requests"]),
                    number(e["failures"]),
                    number(e["unanswered"]),
                    number(e["server"]),
                    number(e["log"]),
                    number(e["p50_ms"]),
                    number(e["p95_ms"]),
                    number(e["p99_ms"]),
                    number(e["max_ms"]),
                    number(e["rps"]),
                ]
                for e in summary["endpoints"]
            ]
            + [
                [
                    "all",
                    number(locust["requests"]),
                    number(locust["failures"]),
                    number(locust["unanswered"]),
                    number(counts["server"]),
                    number(counts["log"]),
                    number(locust["p50_ms"]),
                    number(locust["p95_ms"]),
                    number(locust["p99_ms"]),
                    number(locust["max_ms"]),
                    number(locust["rps"]),
                ]
            ],
        )
    )
    parts.append(
        f"<p class=muted>Counts: locust's answered requests {number(counts['locust_answered'])}, server "
        f"{number(counts['server'])}, log {number(counts['log'])}; they must agree within "
        f"{number(counts['tolerance'])}: {_e(counts['tolerance_why'])}. Percentiles are locust's final statistics "
        "(the client's view, queueing included).</p>"
    )
    checks = [[("PASS", "pass") if c["ok"] else ("FAIL", "fail"), c["name"], c["detail"]] for c in summary["checks"]]
    parts.append("<h2>SLO checks</h2>" + _table(["", "check", "measured"], checks, 3))
    crashes = ", ".join(f"+{s:g} s ({utc(run['start_unix'] + s)})" for s in run["crash_schedule_s"]) or "none"
    parameters = [
        ("users", number(run["users"])),
        ("spawn rate", f"{number(run['spawn_rate'])} users/s (ramp {number(run['ramp_s'])} s)"),
        ("duration", f"{number(run['duration_s'])} s ({number(run['hold_s'])} s at full load)"),
        ("crashes scheduled", crashes),
        ("workers x threads", f"{run['workers']} x {run['threads']}"),
        ("p95 objective", f"{number(summary['slo']['p95_ms'])} ms ({summary['slo']['source']})"),
        (
            "scrape / step / rate window",
            f"{run['scrape_interval_s']:g} s / {run['step_s']:g} s / {run['rate_interval']}",
        ),
        (
            "Alertmanager waits",
            "not run"
            if waits is None
            else f"group_wait {waits['group_wait']}, group_interval {waits['group_interval']}, "
            f"repeat_interval {waits['repeat_interval']}",
        ),
    ]
    parts.append("<div class=two><div><h2>Run parameters</h2>" + _table(["", ""], parameters, 2) + "</div>")
    deaths = [[utc(d["time_unix"]), d["pid"], d["cause"]] for d in summary["worker_deaths"]]
    alerts = [
        [
            a["alertname"],
            a.get("severity", ""),
            utc(a["start_unix"]),
            utc(a["end_unix"]) + (" (still firing)" if a["still_firing"] else ""),
            seconds(a["end_unix"] - a["start_unix"]),
        ]
        for a in summary["alerts"]
    ]
    parts.append("<div><h2>Worker deaths (logs/app.log)</h2>")
    parts.append(_table(["time (UTC)", "pid", "cause"], deaths, 3) if deaths else "<p class=muted>none</p>")
    parts.append("<h2>Alerts fired (Prometheus ALERTS)</h2>")
    parts.append(
        _table(["alert", "severity", "from (UTC)", "to (UTC)", "for"], alerts, 4)
        if alerts
        else "<p class=muted>none</p>"
    )
    parts.append("</div></div>")
    if waits is not None:
        parts.append("<h2>Notifications delivered (Alertmanager, to the local mail server and webhook)</h2>")
        rows = [
            [
                utc(n["arrived_unix"]),
                n["receiver"],
                n["channel"],
                n["to"],
                n["alertname"],
                n["status"],
                n["severity"],
                n["subject"] or n["summary"],
            ]
            for n in notifications
        ]
        head = ["arrived (UTC)", "receiver", "by", "to", "alert", "status", "severity", "subject / summary"]
        parts.append(_table(head, rows, len(head)) if rows else "<p class=muted>none</p>")
    parts.append("</section>")
    return "".join(parts)


# --- exemplars: from a slow bucket to its requests' log lines ------------------------------------

LATENCY_BUCKETS_METRIC = "flask_http_request_duration_seconds_bucket"
SLOWEST_BUCKETS = 3  # the highest `le` buckets that hold an exemplar
EXEMPLARS_SHOWN = 8
LOG_LINES_SHOWN = 6  # per request


def slowest_exemplars(prometheus, log_path: Path, *, start: float, end: float) -> list[dict]:
    """The exemplars Prometheus stored for the latency histogram's slowest buckets over the run
    (the slowest first), each with the lines of logs/app.log that carry its trace id: the path a
    reader takes from a p99 spike to the requests that made it."""
    series = prometheus.query_exemplars(LATENCY_BUCKETS_METRIC, start, end)
    found = [
        {
            "le": labels["le"],
            "route": labels.get("route", ""),
            "method": labels.get("method", ""),
            "status": labels.get("status", ""),
            "trace_id": exemplar["labels"].get("trace_id", ""),
            "request_id": exemplar["labels"].get("request_id", ""),
            "seconds": float(exemplar["value"]),
            "at_unix": float(exemplar["timestamp"]),
        }
        for entry in series
        for labels in [entry["seriesLabels"]]
        for exemplar in entry["exemplars"]
    ]
    unique = {e["trace_id"]: e for e in found}.values()  # one request is stored once a scrape
    slowest = sorted({float(e["le"]) for e in unique}, reverse=True)[:SLOWEST_BUCKETS]
    shown = sorted((e for e in unique if float(e["le"]) in slowest), key=lambda e: -e["seconds"])[:EXEMPLARS_SHOWN]
    lines = log_lines_by_trace(log_path, {e["trace_id"] for e in shown})
    return [{**e, "log_lines": lines[e["trace_id"]]} for e in shown]


def log_lines_by_trace(log_path: Path, trace_ids: set[str]) -> dict[str, list[dict]]:
    """{trace id: its first lines of logs/app.log}, for each of `trace_ids`: what a reader who
    grepped the trace id would see."""
    wanted: dict[str, list[dict]] = {trace_id: [] for trace_id in trace_ids}
    if not wanted or not log_path.exists():
        return wanted
    with log_path.open(encoding="utf-8") as log:
        for line in log:
            if '"trace_id"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            lines = wanted.get(record.get("trace_id"))
            if lines is not None and len(lines) < LOG_LINES_SHOWN:
                lines.append(
                    {
                        "timestamp": record.get("timestamp", ""),
                        "level": record.get("level", ""),
                        "event": record.get("event", ""),
                        "message": record.get("message", ""),
                        "duration_ms": record.get("duration_ms"),
                    }
                )
    return wanted


SENTRY_EVENTS = "sentry-events.json"  # what bench.demo's local Sentry receiver got, one entry per event


def sentry_events(out_dir: Path) -> list[dict]:
    """The run's Sentry events (bench.demo writes them), each with the log lines of its trace: the
    other end of the path from an exemplar or a log line to the crash report."""
    path = out_dir / SENTRY_EVENTS
    if not path.exists():
        return []
    events = json.loads(path.read_text())
    lines = log_lines_by_trace(out_dir / "logs" / "app.log", {e["trace_id"] for e in events if e.get("trace_id")})
    return [{**e, "log_lines": lines.get(e.get("trace_id"), [])} for e in events]


def _log_lines_table(lines: list[dict], what: str) -> str:
    rows = [[r["timestamp"], r["level"], r["event"], r["message"]] for r in lines]
    return (
        _table(["timestamp", "level", "event", "message"], rows, 4)
        if rows
        else f"<p class=muted>no line of logs/app.log has {what}</p>"
    )


def exemplar_section(exemplars: list[dict], events: list[dict] = ()) -> str:
    """The page's list of the slowest buckets' exemplars and their requests' log lines, and how
    many of the run's Sentry events are in each one's trace."""
    in_trace = collections.Counter(e.get("trace_id") for e in events)
    parts = [
        "<section><h2>Slowest requests, by their exemplars (Prometheus query_exemplars, logs/app.log)</h2>",
        "<p class=muted>Each exemplar is the last request a worker counted in a latency bucket; its trace id "
        'finds the request\'s lines in the log (<code>grep \'"trace_id": "&lt;id&gt;"\' logs/app.log</code>) '
        "and its Sentry event (<code>trace:&lt;id&gt;</code>).</p>",
    ]
    if not exemplars:
        parts.append("<p class=muted>none stored in this range</p></section>")
        return "".join(parts)
    rows = [
        [
            f"<= {e['le']} s",
            f"{e['method']} {e['route']} {e['status']}",
            f"{number(e['seconds'] * 1000)} ms",
            utc(e["at_unix"]),
            e["trace_id"],
            e["request_id"],
            str(len(e["log_lines"])),
            str(in_trace[e["trace_id"]]),
        ]
        for e in exemplars
    ]
    head = ["bucket", "request", "took", "at (UTC)", "trace id", "request id", "log lines", "Sentry events"]
    parts.append(_table(head, rows, len(head)))
    for e in exemplars:
        parts.append(f"<h3><code>{_e(e['trace_id'])}</code>: {number(e['seconds'] * 1000)} ms</h3>")
        parts.append(_log_lines_table(e["log_lines"], "this trace id"))
    parts.append("</section>")
    return "".join(parts)


def sentry_section(events: list[dict]) -> str:
    """The run's Sentry events, each with its trace id and the log lines of that trace: a crash
    report joined to the requests it came from, as `trace:<id>` joins them in Sentry."""
    parts = [
        f"<section><h2>Sentry events of the run ({len(events)}, as a local receiver got them: {SENTRY_EVENTS})</h2>",
        "<p class=muted>Each event is in its request's trace (Sentry's <code>trace:&lt;id&gt;</code>); "
        "the same id finds its lines in the log. The master's reports of a worker's death belong to no "
        "request: their trace is the SDK's own, on no log line.</p>",
    ]
    if not events:
        parts.append("<p class=muted>none</p></section>")
        return "".join(parts)
    head = ["at (UTC)", "level", "logger", "message", "trace id", "request id", "log lines"]
    rows = [
        [
            utc(e["timestamp"]) if e.get("timestamp") else "",
            e.get("level", ""),
            e.get("logger", ""),
            e.get("message", ""),
            e.get("trace_id") or "",
            e.get("request_id") or "",
            str(len(e["log_lines"])),
        ]
        for e in events
    ]
    parts.append(_table(head, rows, len(head)))
    for e in events:
        if e.get("request_id"):
            parts.append(f"<h3><code>{_e(e['trace_id'])}</code>: {_e(e.get('message', ''))}</h3>")
            parts.append(_log_lines_table(e["log_lines"], "this trace id"))
    parts.append("</section>")
    return "".join(parts)


def _grid_placement(items: list[dict]) -> dict[int, tuple[int, int]]:
    """{index: (grid row, rows spanned)}: each distinct gridPos y starts a grid row, and a panel
    spans the rows that start within its height, so a tall panel sits beside stacked ones."""
    starts = sorted({item.get("gridPos", {}).get("y", 0) for item in items})
    placement = {}
    for index, item in enumerate(items):
        grid = item.get("gridPos", {})
        y, h = grid.get("y", 0), grid.get("h", 8)
        first = starts.index(y)
        placement[index] = (first + 1, max(1, sum(1 for s in starts if y <= s < y + h)))
    return placement


def page(
    dashboard: dict,
    values: dict,
    cards: dict[int, str],
    *,
    start: float,
    end: float,
    summary: dict | None,
    files: list,
    notes: list,
    exemplars: list[dict] | None = None,
    events: list[dict] | None = None,
) -> str:
    title = interpolate(dashboard.get("title", "dashboard"), values)
    parts = [
        f"<!doctype html><html lang=en><meta charset='utf-8'><title>{_e(title)}: load-test report</title>",
        f"<meta name=viewport content='width=device-width'><style>{CSS}</style><header><div>",
        f"<h1>{_e(title)}</h1>",
        f"<div class=range>{_e(utc_full(start))} → {_e(utc(end))} UTC ({seconds(end - start)})",
        "; every time on this page is UTC</div>",
    ]
    if dashboard.get("description"):
        parts.append(f"<p class=description>{_e(interpolate(dashboard['description'], values))}</p>")
    nav = [f"<a href='{_e(path)}'>{_e(label)}</a>" for path, label in files]
    dashboard_links = _links(dashboard.get("links", []), values, start, end)
    parts.append(f"<nav>{''.join(nav)}{dashboard_links}</nav></div></header><main>")
    if summary is not None:
        parts.append(headline(summary))
    if exemplars is not None:
        parts.append(exemplar_section(exemplars, events or ()))
    if events is not None:
        parts.append(sentry_section(events))
    if notes:
        parts.append("<h2>Annotations (the dashboard's annotation queries)</h2><ul>")
        parts += notes
        parts.append("</ul>")
    for row, items in sections(dashboard):
        if row is not None:
            parts.append(f"<h2 class=row>{_e(interpolate(row.get('title', ''), values))}</h2>")
        placement = _grid_placement(items)
        parts.append("<div class=grid>")
        for index, item in enumerate(items):
            grid = item.get("gridPos", {})
            first, span = placement[index]
            style = f"grid-column:{grid.get('x', 0) + 1}/span {grid.get('w', 12)};grid-row:{first}/span {span}"
            parts.append(f"<div class=panel style='{style}'>{cards.get(id(item), _text_card(item, values))}</div>")
        parts.append("</div>")
    parts.append("</main></html>\n")
    return "".join(parts)


def _text_card(item: dict, values: dict) -> str:
    """A panel without Prometheus queries (a text panel): its title and content as text."""
    content = (item.get("options") or {}).get("content", "") or item.get("description", "")
    title = interpolate(item.get("title", ""), values)
    return f"<h3>{_e(title)}</h3><p class=description>{_e(interpolate(content, values))}</p>"


def _card(
    item: dict, panel: Panel, image: str, result: dict, sent: list, values: dict, start: float, end: float
) -> str:
    title = interpolate(panel.title, values)
    parts = [f"<h3>{_e(title)}</h3>"]
    if panel.description:
        parts.append(f"<p class=description>{_e(interpolate(panel.description, values))}</p>")
    parts.append(f"<img src='{_e(image)}' alt='{_e(title)}'>")
    if result.get("note"):
        parts.append(f"<p class=note>{_e(result['note'])}</p>")
    if result.get("spans") is not None:
        rows = [
            [s["row"], s["text"], utc(s["start"]), utc(s["end"]), seconds(s["end"] - s["start"])]
            for s in result["spans"]
        ]
        parts.append(_table(["series", "value", "from", "to", "for"], rows[:50], 2) if rows else "")
    links = _links(item.get("links", []), values, start, end)
    if links:
        parts.append(f"<div class=links>{links}</div>")
    queries = "".join(f"<code>{_e(ref)}: {_e(query)}</code>" for ref, query in sent)
    parts.append(f"<details><summary>queries ({len(sent)})</summary>{queries}</details>")
    return "".join(parts)


def render(
    prometheus,
    out_dir: Path,
    *,
    start: float,
    end: float,
    step: float = 2.0,
    rate_interval: str = "20s",
    dashboard: dict | None = None,
    summary: dict | None = None,
    page_name: str = PAGE,
) -> dict:
    """One PNG per panel with queries and `page_name` in `out_dir`, every figure over [start, end];
    with `summary` (summary.json), the run's headline on top. Returns what was drawn (also
    written to report.json): the time range, the annotations, and per panel its kind, image,
    series per refId, y range and thresholds."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    dashboard = load() if dashboard is None else dashboard
    # The docs the dashboard's links point at (`$docs_base`): this checkout's, from the page.
    values = {**variables(dashboard), "docs_base": os.path.relpath(ROOT / "docs", out_dir.resolve())}
    macros = {"rate_interval": rate_interval, "interval": f"{step:g}s", "range_": f"{max(1, round(end - start))}s"}
    first = math.ceil(start / step) * step  # the first step inside the run
    grid = [first + i * step for i in range(max(1, int((end - first) // step) + 1))]
    frame = Frame(start, end, step, grid, [])
    drawn = {"start": start, "end": end, "step": step, "annotations": [], "panels": []}
    if prometheus is not None:
        frame.annotations = annotations(prometheus, dashboard, values, start=start, end=end, step=step, macros=macros)
    notes = []
    for entry, query, every in annotation_queries(dashboard, values, step=step, macros=macros):
        marks = [a for a in frame.annotations if a.name == entry.get("name", "")]
        shown = "; ".join(
            f"<b>{_e(a.title)}</b>{' ' + _e(a.text) if a.text else ''} at {utc(a.start)}"
            + ("" if a.is_event else f" → {utc(a.end)}")
            for a in marks
        )
        notes.append(
            f"<li><span class=swatch style='background:{_e(color(entry.get('iconColor'), '#F2495C'))}'></span>"
            f"{_e(entry.get('name', ''))}: {shown or 'none in this range'} <span class=muted>(every "
            f"{every:g} s: <code>{_e(query)}</code>)</span></li>"
        )
    drawn["annotations"] = [dataclasses.asdict(a) for a in frame.annotations]
    cards = {}
    if prometheus is not None:
        number_ = 0
        for item in flatten(dashboard.get("panels", [])):
            panel = panel_of(item)
            if not panel.targets:
                continue
            number_ += 1
            series, counts, sent = query_panel(prometheus, item, panel, frame, macros, values)
            result = DRAW[panel.kind](plt, item, panel, series, frame)
            image = f"panel-{number_:02d}.png"
            result["figure"].savefig(out_dir / image, dpi=DPI)
            xlim = time_limits(result["figure"])
            plt.close(result["figure"])
            cards[id(item)] = _card(item, panel, image, result, sent, values, start, end)
            drawn["panels"].append(
                {
                    "title": panel.title,
                    "kind": panel.kind,
                    "image": image,
                    "series": counts,
                    "xlim": xlim,
                    "ylim": result["ylim"],
                    "thresholds": result["thresholds"],
                    "unit": result["unit"],
                    "note": result["note"],
                    "queries": dict(sent),
                    "spans": result.get("spans"),
                    "styles": result.get("styles"),
                }
            )
    files = [(path, label) for path, label in RUN_FILES if (out_dir / path).exists()]
    log_path = out_dir / "logs" / "app.log"
    exemplars = None
    if prometheus is not None and log_path.exists():  # a demo's run: its exemplars and its log
        exemplars = slowest_exemplars(prometheus, log_path, start=start, end=end)
        drawn["exemplars"] = exemplars
    events = sentry_events(out_dir) if (out_dir / SENTRY_EVENTS).exists() else None
    if events is not None:
        drawn["sentry_events"] = events
    text = page(
        dashboard,
        values,
        cards,
        start=start,
        end=end,
        summary=summary,
        files=files,
        notes=notes,
        exemplars=exemplars,
        events=events,
    )
    if prometheus is None:
        text = text.replace("<main>", "<main><p class=fail>Prometheus was not installed: no panels.</p>", 1)
    (out_dir / page_name).write_text(text)
    (out_dir / "report.json").write_text(json.dumps(drawn, indent=2))
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a finished demo's report again from its Prometheus data.")
    parser.add_argument("report_dir", type=Path, help="a folder `make demo` wrote (summary.json, tsdb/)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = parser.parse_args(argv)
    from bench.harness.prometheus import Prometheus

    summary = json.loads((args.report_dir / "summary.json").read_text())
    run = summary["run"]
    with Prometheus(args.report_dir, targets={}) as prometheus:
        render(
            prometheus,
            args.report_dir,
            start=run["start_unix"],
            end=run["end_unix"],
            step=run["step_s"],
            rate_interval=run["rate_interval"],
            dashboard=load(args.dashboard),
            summary=summary,
        )
    print(args.report_dir / PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
