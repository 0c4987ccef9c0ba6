"""The SLO rules' generator: monitoring/slo.yml (the objectives) -> monitoring/rules/slo.rules.yml
(recording rules for the error ratios at every window the tiers use and over the whole period,
the budget's, and one burn-rate alert per SLO and tier), so the numbers live in one file and every
rule follows from them.

    python -m monitoring.slo           # write monitoring/rules/slo.rules.yml
    python -m monitoring.slo --check   # exit 1 if it is not what the spec gives (the tests run it)

`compress` shortens every window, `for` and group interval of a rule file by a factor: the
end-to-end alerting test runs the repo's rules, this generator's included, in seconds instead of
hours (promtool proves the real timing on the real files).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parent
SPEC = MONITORING / "slo.yml"
RULES = MONITORING / "rules" / "slo.rules.yml"
HISTOGRAM = "flask_http_request_duration_seconds"
RUNBOOKS = "docs/runbooks"
# Windows up to this long are evaluated with Prometheus' global interval; longer ones in a group
# of their own at the spec's slow_windows_interval.
FAST_WINDOW_LIMIT = 3600

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
RANGE = re.compile(r"\[(\d+(?:ms|s|m|h|d|w|y))\]")


def seconds(duration: str) -> float:
    """A Prometheus duration of one unit (`5m`, `3d`) in seconds."""
    match = DURATION.fullmatch(duration)
    if match is None:
        raise ValueError(f"{duration!r}: not a one-unit Prometheus duration")
    return int(match.group(1)) * UNITS[match.group(2)]


def duration(value: float) -> str:
    """Seconds as the largest whole Prometheus unit (`3600` -> `1h`; below a second, in ms)."""
    millis = round(value * 1000)
    for unit in ("d", "h", "m", "s"):
        size = round(UNITS[unit] * 1000)
        if millis and millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"


def number(value: float) -> str:
    """A constant for PromQL: four significant digits, no float noise (1 - 0.999 is 0.001)."""
    return f"{float(f'{value:.4g}'):g}"


def percent(ratio: float) -> str:
    return f"{float(f'{ratio * 100:.4g}'):g}%"


def load(path: Path = SPEC) -> dict:
    spec = yaml.safe_load(path.read_text())
    from service.observability.metrics import LATENCY_BUCKETS

    for slo in spec["slos"]:
        if slo["sli"] not in ("availability", "latency"):
            raise ValueError(f"{slo['name']}: sli must be availability or latency, not {slo['sli']!r}")
        if slo["sli"] == "latency" and float(slo["threshold"]) not in LATENCY_BUCKETS:
            raise ValueError(
                f"{slo['name']}: threshold {slo['threshold']} s is not a bucket bound of {HISTOGRAM} "
                f"{LATENCY_BUCKETS}: the share under it would be an estimate"
            )
        if not 0 < slo["objective"] < 1:
            raise ValueError(f"{slo['name']}: objective is a ratio, e.g. 0.999")
    return spec


def windows(spec: dict) -> list[str]:
    """Every window a tier reads, shortest first."""
    return sorted({w for tier in spec["tiers"] for w in (tier["long"], tier["short"])}, key=seconds)


def selector(spec: dict, slo: dict, *extra: str) -> str:
    return ", ".join([f'job="{spec["job"]}"', f'route=~"{slo["routes"]}"', *extra])


def sli_rates(spec: dict, slo: dict, window: str) -> tuple[str, str]:
    """(good, valid) request rates over `window`: PromQL, summed per job."""
    not_5xx = 'status!~"5.."'
    if slo["sli"] == "availability":
        valid = f"{HISTOGRAM}_count{{{selector(spec, slo)}}}"
        good = f"{HISTOGRAM}_count{{{selector(spec, slo, not_5xx)}}}"
    else:  # a 5xx answer is availability's to count, however fast it was
        bound = f'le="{float(slo["threshold"]):g}"'
        valid = f"{HISTOGRAM}_count{{{selector(spec, slo, not_5xx)}}}"
        good = f"{HISTOGRAM}_bucket{{{selector(spec, slo, not_5xx, bound)}}}"
    return (f"sum by (job) (rate({good}[{window}]))", f"sum by (job) (rate({valid}[{window}]))")


def recording_rules(spec: dict, slo: dict, window: str) -> list[dict]:
    good, valid = sli_rates(spec, slo, window)
    labels = {"slo": slo["name"]}
    ratio = f"1 - (\n  {good}\n/\n  {valid}\n)\n"
    return [
        {"record": f"flaskapi_slo:requests:rate{window}", "expr": valid, "labels": labels},
        {"record": f"flaskapi_slo:error_ratio:rate{window}", "expr": ratio, "labels": labels},
    ]


def guard(spec: dict, slo: dict, tier: dict) -> float:
    """The least request rate over the long window at which `min_bad_requests` failed ones are
    needed to reach the tier's threshold ratio."""
    budget = 1 - slo["objective"]
    return spec["min_bad_requests"] / (tier["burn_rate"] * budget * seconds(tier["long"]))


def alert_rule(spec: dict, slo: dict, tier: dict) -> dict:
    budget = 1 - slo["objective"]
    burn, long, short = tier["burn_rate"], tier["long"], tier["short"]
    at = f'{{slo="{slo["name"]}"}}'
    over = f"/ {number(budget)} > {number(burn)}"
    expr = (
        f"flaskapi_slo:error_ratio:rate{long}{at} {over}\n"
        f"and flaskapi_slo:error_ratio:rate{short}{at} {over}\n"
        f"and flaskapi_slo:requests:rate{long}{at} > {number(guard(spec, slo, tier))}\n"
    )
    objective = f"{percent(slo['objective'])} over {spec['period']}"
    return {
        "alert": slo["alert"],
        "expr": expr,
        "for": tier["for"],
        "labels": {"severity": tier["severity"], "slo": slo["name"], "window": long},
        "annotations": {
            "summary": f"flaskapi {slo['name']} SLO ({objective}): error budget burning over {number(burn)}x "
            f"over {long}",
            "description": (
                f'{{{{ $value | printf "%.1f" }}}}x the burn rate that spends the {spec["period"]} budget in '
                f"{spec['period']}, over the last {long}, and still over {number(burn)}x in the last {short}: "
                f"{slo['what']} are over {percent(burn * budget)} of requests (budget {percent(budget)})."
            ),
            "runbook_url": f"{RUNBOOKS}/{slo['alert']}.md",
            "logs": slo["logs"],
        },
    }


def rules(spec: dict) -> dict:
    """The rule file: per SLO, a group with the short windows and the tiers that read them at the
    global interval, one with the long windows at `slow_windows_interval`, and one with the
    period's window (the budget) at `budget_interval`."""
    groups = []
    for slo in spec["slos"]:
        fast = [w for w in windows(spec) if seconds(w) <= FAST_WINDOW_LIMIT]
        slow = [w for w in windows(spec) if seconds(w) > FAST_WINDOW_LIMIT]
        for suffix, group_windows, interval in (
            ("", fast, None),
            ("-slow", slow, spec["slow_windows_interval"]),
            ("-budget", [spec["period"]], spec["budget_interval"]),
        ):
            group = {"name": f"flaskapi-slo-{slo['name']}{suffix}"}
            if interval is not None:
                group["interval"] = interval
            group["rules"] = [rule for w in group_windows for rule in recording_rules(spec, slo, w)]
            group["rules"] += [alert_rule(spec, slo, t) for t in spec["tiers"] if t["long"] in group_windows]
            groups.append(group)
    return {"groups": groups}


def header(spec: dict) -> str:
    lines = [
        "# GENERATED by `python -m monitoring.slo` from monitoring/slo.yml: edit that file, not this one",
        "# (tests/test_alerting_rules.py fails when they disagree). Tests: slo.rules.test.yml,",
        "# slo-days.rules.test.yml, slo-budget.rules.test.yml.",
        "#",
        "# Tiers (threshold = burn rate x budget; guard = least request rate over the long window):",
    ]
    for slo in spec["slos"]:
        budget = 1 - slo["objective"]
        for tier in spec["tiers"]:
            requests = guard(spec, slo, tier) * seconds(tier["long"])
            lines.append(
                f"#   {slo['name']:<14} {tier['severity']:<6} {tier['long']:>3}+{tier['short']:<4}"
                f" error ratio > {percent(tier['burn_rate'] * budget):<6}"
                f" guard > {number(guard(spec, slo, tier))} req/s ({requests:.0f} requests in {tier['long']})"
            )
    lines += [
        "#",
        f"# Budget: flaskapi_slo:error_ratio:rate{spec['period']}, evaluated every {spec['budget_interval']}; the",
        f"# share of the {spec['period']} budget left is 1 - it / (1 - objective) (the dashboard's SLO row).",
    ]
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the expressions) as literal blocks, as a person would write them, and
    no YAML aliases for values that repeat."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None),
)


def dump(document: dict) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def render(spec: dict | None = None) -> str:
    spec = load() if spec is None else spec
    return header(spec) + dump(rules(spec))


def compress(document: dict, factor: float, *, floor: str = "5s") -> dict:
    """A copy of a rule file's document running `factor` times faster: every range window, `for`
    and group interval divided by it. Windows never go below `floor`, so a rate still has samples
    at the test's scrape interval."""
    least = seconds(floor)

    def window(match: re.Match) -> str:
        return f"[{duration(max(least, seconds(match.group(1)) / factor))}]"

    def shorter(value: str) -> str:
        return duration(seconds(value) / factor) if seconds(value) else value

    def faster_rule(rule: dict) -> dict:
        faster = dict(rule, expr=RANGE.sub(window, rule["expr"]))
        if "for" in faster:
            faster["for"] = shorter(faster["for"])
        return faster

    def faster_group(group: dict) -> dict:
        faster = dict(group, rules=[faster_rule(rule) for rule in group["rules"]])
        if "interval" in faster:
            faster["interval"] = duration(max(1.0, seconds(faster["interval"]) / factor))
        return faster

    return {**document, "groups": [faster_group(group) for group in document["groups"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.slo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {RULES.name} is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not RULES.exists() or RULES.read_text() != text:
            print(f"{RULES} is not what {SPEC.name} gives: run `python -m monitoring.slo`", file=sys.stderr)
            return 1
        return 0
    RULES.write_text(text)
    print(f"wrote {RULES} ({sum(len(g['rules']) for g in rules(load())['groups'])} rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
