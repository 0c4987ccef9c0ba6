"""`make fleet`: several app instances behind nginx, their machine and the database in one view.

Starts N gunicorn instances on one database behind the project's nginx (bench/harness/fleet.py:
each an app host of its own, app-1, app-2, ...), the node and Postgres exporters, Prometheus
finding every instance and exporter in its target files (monitoring/prometheus.yml's file_sd
jobs), and the lesson's load from locust with several processes, through nginx. Then it writes
the dashboard as one page (bench/report.py: every panel, with the per-instance and per-host
ones) and judges the run:

- no locust failure;
- every instance served requests (its own access log), and nginx's log names each of them;
- the per-instance panels show every instance, and every panel of the Hosts and Database server
  rows has data from the real exporters.

On this 2-core machine the instances share the cores: the run shows one view of a fleet, not
scale-out (the edge's cost is `python -m bench.run --only edge`).

    python -m bench.fleet [--instances 2] [--workers 2] [--users 60] [--ramp 20] [--hold 20]
                          [--locust-processes 2] [--db-uri URI] [--out reports/fleet-...]

Exit status 0 when every check passes, 1 when one fails, 2 when --out is not a new or empty folder.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from bench import demo, report
from bench.harness import exporters
from bench.harness.environment import ROOT, free_port, locust_env
from bench.harness.fleet import Fleet
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus

SCRAPE_INTERVAL = demo.SCRAPE_INTERVAL
PER_INSTANCE_PANELS = ("Requests/s by instance", "App instances up")
EXPORTER_ROWS = ("Hosts", "Database server")


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2, help="app instances behind nginx")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per instance")
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--ramp", type=float, default=20, help="seconds to reach --users")
    parser.add_argument("--hold", type=float, default=20, help="seconds at full load")
    parser.add_argument("--locust-processes", type=int, default=2, help="locust worker processes")
    parser.add_argument("--db-uri", default=None, help="a migrated database (default: flaskapi_demo, embedded)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def access_counts(fleet: Fleet, start: float, end: float) -> dict[str, int]:
    """{instance: its access lines over the run}, from each instance's own log."""
    counts = {}
    for name in fleet.names:
        access, _deaths = demo.read_log(fleet.workdir / name / "logs" / "app.log", start, end)
        counts[name] = sum(access.values())
    return counts


def nginx_upstreams(fleet: Fleet) -> dict[str, int]:
    """{instance: the requests nginx's access log says it sent there}."""
    by_address = collections.Counter(entry.get("upstream_addr", "") for entry in fleet.nginx.access_log())
    return {name: by_address.get(address, 0) for name, address in fleet.upstreams.items()}


def panel_rows(dashboard: dict) -> dict[str, str]:
    """{panel title: the title of the row it is under}."""
    return {
        item.get("title", ""): (row or {}).get("title", "")
        for row, items in report.sections(dashboard)
        for item in report.flatten(items)
    }


def judge(summary: dict, drawn: dict, dashboard: dict) -> list[dict]:
    instances = summary["instances"]
    checks = [
        ("locust ran to the end", summary["locust_exit"] == 0, f"exit status {summary['locust_exit']}"),
        (
            "no failed request",
            summary["locust"]["failures"] == 0 and summary["locust"]["requests"] > 0,
            f"{summary['locust']['failures']} failures in {summary['locust']['requests']} requests",
        ),
        (
            "every instance served requests",
            all(summary["access_lines"][name] > 0 and summary["nginx_sent"][name] > 0 for name in instances),
            ", ".join(
                f"{name}: {summary['access_lines'][name]} access lines, nginx sent {summary['nginx_sent'][name]}"
                for name in instances
            ),
        ),
    ]
    by_title = {panel["title"]: panel for panel in drawn["panels"]}
    shown = {title: max(by_title[title]["series"].values(), default=0) for title in PER_INSTANCE_PANELS}
    checks.append(
        (
            "the per-instance panels show every instance",
            all(count == len(instances) for count in shown.values()),
            ", ".join(f"{title}: {count} series" for title, count in shown.items()) + f" ({len(instances)} instances)",
        )
    )
    rows = panel_rows(dashboard)
    exporter_panels = [p for p in drawn["panels"] if rows.get(p["title"]) in EXPORTER_ROWS]
    empty = [p["title"] for p in exporter_panels if not any(p["series"].values())]
    checks.append(
        (
            "every panel of the Hosts and Database server rows has data",
            bool(exporter_panels) and not empty,
            f"{len(exporter_panels) - len(empty)} of {len(exporter_panels)} panels"
            + (f"; empty: {', '.join(empty)}" if empty else ""),
        )
    )
    return [{"name": name, "ok": bool(ok), "detail": detail} for name, ok, detail in checks]


def markdown(summary: dict) -> str:
    lines = [
        f"# Fleet run: {summary['verdict'].upper()}",
        "",
        f"{summary['start']} to {summary['end']}: {len(summary['instances'])} instances x "
        f"{summary['workers']} workers behind nginx, {summary['users']} users from "
        f"{summary['locust_processes']} locust processes, {summary['locust']['requests']} requests "
        f"(p95 {summary['locust']['p95_ms']} ms, {summary['locust']['rps']:.1f} req/s through nginx).",
        "",
        "| check | | measured |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {c['name']} | {'pass' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in summary["checks"]]
    lines += ["", "Files: `dashboard.html` (every panel), `summary.json`, `app-N/logs/app.log`, `nginx/`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    out = (args.out or ROOT / "reports" / time.strftime("fleet-%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty: give --out a new or empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    uri = args.db_uri or demo.migrated_demo_database()
    locust_port = free_port()
    rate_interval = report.grafana_rate_interval(SCRAPE_INTERVAL, SCRAPE_INTERVAL)
    print(f"report folder: {out}")
    with Fleet(out, uri, instances=args.instances, workers=args.workers) as fleet:
        print(f"nginx {fleet.url} in front of " + ", ".join(f"{n} {a}" for n, a in fleet.upstreams.items()))
        fleet.write_targets(out)  # before Prometheus starts: it finds every instance at once
        with (
            exporters.host_and_database(out, uri, free_port(), free_port()),
            Prometheus(
                out,
                interval=f"{SCRAPE_INTERVAL:g}s",
                targets={"locust": f"127.0.0.1:{locust_port}"},
                every_group_at_interval=True,
            ) as prometheus,
        ):
            print(f"Prometheus {prometheus.url}")
            wait_for(
                lambda: len(prometheus.query('count_over_time(up{job="flaskapi"}[1m]) >= 2')) == args.instances,
                "Prometheus's first two scrapes of every instance",
            )
            wait_for(lambda: prometheus.query('up{job="postgres"} == 1'), "the Postgres exporter's first scrape")
            generator = locust_env(
                LOCUST_METRICS_BIND=f"127.0.0.1:{locust_port}", LOCUST_SUMMARY_JSON=str(out / "locust-final.json")
            )
            print(f"locust: {args.users} users over {args.ramp:g} s, {args.hold:g} s steady, through nginx")
            started = time.time()
            result = demo.run_ramp(fleet.url, args, out, generator)
            locust_ended = time.time()
            wait_for(
                lambda: (
                    any(float(s["value"][1]) > locust_ended for s in prometheus.query('timestamp(up{job="postgres"})'))
                    and all(
                        float(s["value"][1]) > locust_ended for s in prometheus.query('timestamp(up{job="flaskapi"})')
                    )
                ),
                "Prometheus's first scrape of every target after locust ended",
            )
            ended = time.time()
            dashboard = report.load()
            drawn = report.render(
                prometheus, out, start=started, end=ended, step=SCRAPE_INTERVAL, rate_interval=rate_interval
            )
        final_path = out / "locust-final.json"
        final = json.loads(final_path.read_text()) if final_path.exists() else {"total": {}}
        total = final.get("total", {})
        summary = {
            "start": report.utc_full(started),
            "end": report.utc_full(ended),
            "start_unix": started,
            "end_unix": ended,
            "instances": fleet.names,
            "workers": args.workers,
            "users": args.users,
            "locust_processes": args.locust_processes,
            "locust_exit": result.returncode,
            "locust": {k: total.get(k, 0) for k in ("requests", "failures", "p50_ms", "p95_ms", "p99_ms", "rps")},
            "access_lines": access_counts(fleet, started, ended),
            "nginx_sent": nginx_upstreams(fleet),
        }
    summary["checks"] = judge(summary, drawn, dashboard)
    summary["verdict"] = "pass" if all(c["ok"] for c in summary["checks"]) else "fail"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"report: {out / report.PAGE}")
    failed = [c for c in summary["checks"] if not c["ok"]]
    for check in failed:
        print(f"FAILED: {check['name']}: {check['detail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
