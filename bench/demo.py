"""`make demo`: the lesson's load test, watched. Starts the stack (crash route on), Prometheus if
installed, ramps headless locust to 200 users with a worker crash in the middle, then writes a
report folder: locust's HTML and CSVs, every dashboard panel rendered from Prometheus with the
dashboard JSON's own queries, and a summary. Stops everything it started.

    python -m bench.demo [--users 200] [--ramp 60] [--hold 30] [--crash-at 45] [--out reports/demo-...]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import report, run
from bench.harness.environment import ROOT, free_port, locust_command, locust_env, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.prometheus import Prometheus


def migrated_demo_database() -> str:
    """A `flaskapi_demo` database on the embedded development Postgres (kept between demos), migrated."""
    from service import devdb

    uri = devdb.create_database(run.dev_server(), "flaskapi_demo")
    run.cli(uri, "db", "upgrade")
    return uri


def locust_totals(csv_prefix: Path) -> dict:
    with open(f"{csv_prefix}_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "rps": round(float(total["Requests/s"]), 1),
        "p50_ms": float(total["50%"]),
        "p95_ms": float(total["95%"]),
        "p99_ms": float(total["99%"]),
        "max_ms": float(total["Max Response Time"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--ramp", type=float, default=60, help="seconds to reach --users")
    parser.add_argument("--hold", type=float, default=30, help="seconds at full load")
    parser.add_argument("--crash-at", type=float, default=45, help="seconds after start; 0 = no crash")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    out = args.out or ROOT / "reports" / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    prometheus_installed = Path(Prometheus.BINARY).exists()
    if not prometheus_installed:
        print(
            "Prometheus is not installed (Debian/Ubuntu: sudo apt-get install prometheus): "
            "the report will have locust's view only.",
            file=sys.stderr,
        )

    duration = int(args.ramp + args.hold)
    env = stack_env(migrated_demo_database(), out, CRASH_ROUTE_ENABLED="1", LOG_CONSOLE="0")
    locust_port = free_port()
    print(f"report folder: {out}")
    with Gunicorn(env, workers=args.workers, log_path=out / "gunicorn.out") as stack:
        print(f"API {stack.url}   metrics {stack.metrics_url}")
        prometheus = None
        if prometheus_installed:
            prometheus = Prometheus(
                out,
                interval="2s",
                targets={"flaskapi": f"127.0.0.1:{stack.metrics_port}", "locust": f"127.0.0.1:{locust_port}"},
            ).start()
            print(f"Prometheus {prometheus.url}")
        try:
            started = time.time()
            generator = locust_env(LOCUST_METRICS_BIND=f"127.0.0.1:{locust_port}")
            if args.crash_at:
                generator["LOCUST_CRASH_AT"] = str(args.crash_at)
            print(
                f"locust: {args.users} users over {args.ramp:.0f}s, then {args.hold:.0f}s steady"
                + (f", crash at +{args.crash_at:.0f}s" if args.crash_at else "")
            )
            subprocess.run(
                locust_command(
                    stack.url,
                    users=args.users,
                    rate=f"{args.users / args.ramp:.3f}",
                    seconds=duration,
                    stop_timeout=10,
                    extra=("--csv", str(out / "locust"), "--html", str(out / "locust.html")),
                ),
                cwd=ROOT,
                env=generator,
                timeout=duration + 120,
                check=True,
            )
            time.sleep(5)
            ended = time.time()
            summary = {"users": args.users, "duration_s": duration, **locust_totals(out / "locust")}
            if prometheus is not None:
                marks = {"crash": started + args.crash_at} if args.crash_at else {}
                report.render(prometheus, out, start=started, end=ended, step=2, marks=marks)
                restarts = prometheus.query("sum(flaskapi_worker_restarts_total)", ended)
                summary["worker_restarts_seen"] = int(float(restarts[0]["value"][1])) if restarts else None
                server_5xx = prometheus.query('sum(flask_http_request_total{status=~"5.."})', ended)
                summary["server_5xx"] = int(float(server_5xx[0]["value"][1])) if server_5xx else 0
        finally:
            if prometheus is not None:
                prometheus.stop()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = (
        [f"# Load-test demo ({time.strftime('%Y-%m-%d %H:%M')})", ""]
        + [f"- {key}: {value}" for key, value in summary.items()]
        + ["", "Files: `locust.html`, `locust_stats.csv`, `dashboard.html` (every Grafana panel), `logs/app.log`."]
    )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
