"""`make demo`: the lesson's load test, watched and judged. Starts the stack (crash route on),
Prometheus with the repo's rules and Alertmanager with the repo's routes (its mail and webhook
going to local receivers), ramps headless locust with worker crashes on a schedule, counts every
request three ways (locust, the server's counter, the access log), waits for the notifications
the crashes should send, judges the run against the demo's SLO and writes a report folder:
dashboard.html (every dashboard panel from Prometheus, the run's numbers and the notifications
delivered on top), summary.json, summary.md, locust.html, logs/app.log, sentry-events.json (what
a local Sentry receiver got: the crashes' reports, each in its request's trace) and Prometheus's
data (tsdb/, for `python -m bench.report`). Stops everything it started.

    python -m bench.demo [--users 200] [--ramp 60] [--hold 30] [--crash-at 45[,70]] [--workers 3]
                         [--threads 4] [--p95-slo-ms 500] [--db-uri URI] [--out reports/demo-...]

Exit status 0 when every check passes, 1 when one fails (each failed check is printed), 2 when
--out is not a new or empty folder.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

import yaml

from bench import report, run
from bench.harness import rsyslog
from bench.harness.alertmanager import Alertmanager
from bench.harness.commands import run_command
from bench.harness.environment import ROOT, free_port, locust_command, locust_env, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from bench.harness.receivers import SmtpReceiver, WebhookReceiver
from bench.harness.scrape import metric, scrape
from bench.harness.sentry_receiver import SentryReceiver

RULES = ROOT / "monitoring" / "rules" / "flaskapi.rules.yml"
LATENCY_ALERT = "FlaskapiLatencyP95AboveSLO"
RESTART_ALERT = "FlaskapiWorkerRestarted"
SCRAPE_INTERVAL = 2.0  # Prometheus's, and the report's query step
STOP_TIMEOUT = 10  # seconds locust lets its users finish the request in hand at the end
# Alertmanager's waits. The repo's (a ticket's first notification after 30 s, a page's after 10 s,
# a group's changes every 1 to 5 min) batch what fires within a few of production's 5 s
# evaluations; the demo evaluates every 2 s and its short run lasts 25 s, so the same batching at
# its own pace: two evaluations for what fires together, a few for a group's changes.
ALERTMANAGER_WAITS = {"group_wait": "4s", "group_interval": "10s", "repeat_interval": "1h"}  # no repeat in a demo
NOTIFICATION_TIMEOUT = 60  # seconds the demo waits after the load for the notifications it expects
# FlaskapiWorkerRestarted is a warning: a ticket, mailed to the team (monitoring/alertmanager.yml).
CRASH_NOTIFICATION = ("team", "email", RESTART_ALERT)
# The subject of every mail, as monitoring/alertmanager/templates/flaskapi.tmpl writes it:
# "[FIRING:1] FlaskapiWorkerRestarted (warning) flaskapi".
SUBJECT = re.compile(r"\[(?P<status>[A-Z]+)(?::\d+)?\] (?P<alertname>\S+) \((?P<severity>[^)]*)\)")


def migrated_demo_database() -> str:
    """A `flaskapi_demo` database on the embedded development Postgres (kept between demos), migrated."""
    from service import devdb

    uri = devdb.create_database(run.dev_server(), "flaskapi_demo")
    run.cli(uri, "db", "upgrade")
    return uri


def slo_p95_ms(rules: Path = RULES) -> float:
    """The p95 objective of the alert rules (FlaskapiLatencyP95AboveSLO's `> 0.5`), in ms: the
    demo judges itself by the number the alert pages on."""
    groups = yaml.safe_load(rules.read_text())["groups"]
    (expr,) = [rule["expr"] for group in groups for rule in group["rules"] if rule.get("alert") == LATENCY_ALERT]
    return float(re.search(r">\s*([0-9.]+)\s*$", expr.strip()).group(1)) * 1000


def endpoint(method: str, route: str | None) -> str:
    """A request's endpoint as locust names it: the method and the route template, its
    parameters as [id] (`PUT /books/<book_id:book_id>` is `PUT /books/[id]`, locustfile.py)."""
    return f"{method} {re.sub(r'<[^>]+>', '[id]', route or '<unmatched>')}"


def server_counts(samples) -> collections.Counter:
    """Requests the server answered, by endpoint: the request histogram's count, which is
    flask_http_request_total split by route (the counter itself has no route label)."""
    counts = collections.Counter()
    for name, labels, value in samples:
        if name == "flask_http_request_duration_seconds_count":
            counts[endpoint(labels["method"], labels["route"])] += int(value)
    return counts


CRASH_LOGGER = "service.crash"  # service/auth/crash.py: the line (and event) written before the exit


def sentry_events(received: list[dict]) -> list[dict]:
    """The Sentry error events the receiver got, as the report lists them: when, level, logger,
    message, the event's trace id (its request's trace, for a request's event) and request id."""
    events = []
    for event in received:
        entry = event.get("logentry") or {}
        exceptions = (event.get("exception") or {}).get("values") or [{}]
        message = entry.get("formatted") or event.get("message") or entry.get("message") or exceptions[-1].get("type")
        when = event.get("timestamp")
        if isinstance(when, str):
            when = dt.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
        events.append(
            {
                "event_id": event.get("event_id"),
                "timestamp": when,
                "level": event.get("level", ""),
                "logger": event.get("logger", ""),
                "message": message or "",
                "trace_id": ((event.get("contexts") or {}).get("trace") or {}).get("trace_id"),
                "request_id": (event.get("tags") or {}).get("request_id"),
            }
        )
    return sorted(events, key=lambda e: e["timestamp"] or 0)


def sentry_summary(events: list[dict], log_file: Path) -> dict:
    """How many events arrived, and the crashes' among them: each one's trace id must be on the
    crash's own line in the log (the join the report shows)."""
    crashes = [e for e in events if e["logger"] == CRASH_LOGGER]
    lines = report.log_lines_by_trace(log_file, {e["trace_id"] for e in crashes if e["trace_id"]})
    joined = [e for e in crashes if any(line["event"] == "crash_requested" for line in lines.get(e["trace_id"], []))]
    return {"events": len(events), "crash_events": len(crashes), "crash_events_in_the_log": len(joined)}


def read_log(path: Path, start: float, end: float) -> tuple[collections.Counter, list[dict]]:
    """From the service's JSON log, between `start` and `end`: the access lines by endpoint and
    the workers the master saw die (time, pid, cause)."""
    access, deaths = collections.Counter(), []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
            at = dt.datetime.fromisoformat(record["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if not start <= at <= end:
            continue
        if record.get("event") == "access":
            access[endpoint(record.get("method", ""), record.get("route"))] += 1
        elif record.get("event") == "worker_died":
            deaths.append({"time_unix": at, "time": report.utc_full(at), "pid": record.get("worker_pid"),
                           "cause": record.get("cause", "")})  # fmt: skip
    return access, deaths


def firing_alerts(prometheus, start: float, end: float, step: float) -> list[dict]:
    """Each alert's firing spans over the run, from Prometheus's ALERTS series."""
    found = []
    first = report.aligned(start, step)
    for series in prometheus.query_range('ALERTS{alertstate="firing"}', first, end, step):
        labels = series["metric"]
        for span_start, span_end in report.spans([float(t) for t, _ in series["values"]], step):
            found.append(
                {
                    "alertname": labels.get("alertname", ""),
                    "severity": labels.get("severity", ""),
                    "start_unix": span_start,
                    "end_unix": span_end,
                    "start": report.utc_full(span_start),
                    "end": report.utc_full(span_end),
                    "still_firing": span_end + step > end,
                }
            )
    return sorted(found, key=lambda alert: alert["start_unix"])


def notifications(smtp: SmtpReceiver, hook: WebhookReceiver, mail_receivers: dict[str, str]) -> list[dict]:
    """Every notification the local receivers took, in arrival order: to whom (the receiver, by
    email or webhook, the address or path), about what (the alert, firing or resolved, its
    severity), when it arrived, and what a person reads first (the mail's subject, the summary
    of its first alert)."""
    found = []
    for mail in smtp.received():
        subject = SUBJECT.match(mail.subject)
        first = mail.text.split("\n", 1)[0]  # "FIRING: <summary>"
        found.append(
            {
                "receiver": mail_receivers.get(mail.to[0], "") if mail.to else "",
                "channel": "email",
                "to": ", ".join(mail.to),
                "alertname": subject["alertname"] if subject else "",
                "status": subject["status"].lower() if subject else "",
                "severity": subject["severity"] if subject else "",
                "arrived_unix": mail.received,
                "arrived": report.utc_full(mail.received),
                "subject": mail.subject,
                "summary": first.split(": ", 1)[-1],
            }
        )
    for post in hook.received():
        labels, alerts = post.body.get("commonLabels", {}), post.alerts
        found.append(
            {
                "receiver": post.body.get("receiver", ""),
                "channel": "webhook",
                "to": post.path,
                "alertname": labels.get("alertname", ""),
                "status": post.body.get("status", ""),
                "severity": labels.get("severity", ""),
                "arrived_unix": post.received,
                "arrived": report.utc_full(post.received),
                "subject": "",
                "summary": alerts[0].get("annotations", {}).get("summary", "") if alerts else "",
            }
        )
    return sorted(found, key=lambda notification: notification["arrived_unix"])


def expected_notifications(crashes: list[float]) -> list[tuple[str, str, str]]:
    """(receiver, channel, alert) of what the run must deliver: the crashes' ticket."""
    return [CRASH_NOTIFICATION] if crashes else []


def arrived(found: list[dict], expected: list[tuple[str, str, str]]) -> bool:
    """Whether each expected notification has arrived firing."""
    firing = {(n["receiver"], n["channel"], n["alertname"]) for n in found if n["status"] == "firing"}
    return set(expected) <= firing


def ms(value) -> float | None:
    return None if value is None else round(float(value), 1)


def endpoint_row(entry: dict, server: collections.Counter, access: collections.Counter) -> dict:
    key = f"{entry['method']} {entry['name']}" if entry["method"] else "all"
    unanswered = int(entry["answers"].get("0", 0))
    return {
        "endpoint": key,
        "requests": entry["requests"],
        "failures": entry["failures"],
        "unanswered": unanswered,
        "answered_failures": entry["failures"] - unanswered,
        "server": server.get(key, 0),
        "log": access.get(key, 0),
        "answers": entry["answers"],
        "p50_ms": ms(entry["p50_ms"]),
        "p95_ms": ms(entry["p95_ms"]),
        "p99_ms": ms(entry["p99_ms"]),
        "max_ms": ms(entry["max_ms"]),
        "avg_ms": ms(entry["avg_ms"]),
        "rps": round(entry["rps"], 1),
    }


def judge(summary: dict, *, locust_exit: int, prometheus_ran: bool, alertmanager_ran: bool = False) -> list[dict]:
    """The demo's SLO, check by check: {name, ok, detail}."""
    run_, locust, counts, server = summary["run"], summary["locust"], summary["counts"], summary["server"]
    crashes = len(run_["crash_schedule_s"])
    may_break = run_["threads"] * crashes
    checks = [
        ("locust ran to the end", locust_exit == 0, f"exit status {locust_exit}"),
        ("no 5xx answers", server["status_5xx"] == 0, f"{server['status_5xx']} answers with 5xx (server's counter)"),
        (
            "locust failures are only the crashes' broken connections",
            locust["answered_failures"] == 0 and locust["unanswered"] <= may_break,
            f"{locust['answered_failures']} failed with an answer; {locust['unanswered']} never answered "
            f"(at most {may_break}: {run_['threads']} threads x {crashes} crash(es))",
        ),
        (
            "worker restarts = scheduled crashes",
            server["worker_restarts"] == crashes,
            f"{server['worker_restarts']} observed, {crashes} scheduled",
        ),
    ]
    slo = summary["slo"]["p95_ms"]
    books = [e for e in summary["endpoints"] if e["endpoint"].split(" ", 1)[1].startswith("/books")]
    slow = [f"{e['endpoint']} {e['p95_ms']:g} ms" for e in books if e["p95_ms"] is None or e["p95_ms"] > slo]
    measured = ", ".join(f"{e['endpoint']} {e['p95_ms']:g} ms" for e in books) or "no books requests"
    checks.append((f"p95 <= {slo:g} ms on every books endpoint", bool(books) and not slow, measured))
    sentry = summary.get("sentry")
    if sentry is not None:
        checks.append(
            (
                "every crash reached Sentry in its request's trace",
                sentry["crash_events"] == crashes == sentry["crash_events_in_the_log"],
                f"{sentry['crash_events']} crash events for {crashes} crash(es), "
                f"{sentry['crash_events_in_the_log']} with their trace id on the crash's log line "
                f"({sentry['events']} Sentry events in all)",
            )
        )
    checks.append(
        (
            "the three counts agree",
            counts["agree"],
            f"locust answered {counts['locust_answered']}, server {counts['server']}, log {counts['log']} "
            f"(tolerance {counts['tolerance']})",
        )
    )
    if prometheus_ran:
        fired = sorted({alert["alertname"] for alert in summary["alerts"]})
        expected = [RESTART_ALERT] if crashes else []
        name = "alerts fired: the crashes' worker restarts, nothing else"
        ok = fired == expected
        detail = f"fired {', '.join(fired) or 'none'}; expected {', '.join(expected) or 'none'}"
        if alertmanager_ran:
            # a resolution may follow on a long run: what was sent must be about what is expected
            wanted = expected_notifications(run_["crash_schedule_s"])
            sent = sorted({(n["receiver"], n["channel"], n["alertname"]) for n in summary["notifications"]})
            name = "alerts as expected: the crashes' worker restarts fired and were mailed to the team, nothing else"
            ok = ok and sent == sorted(wanted) and arrived(summary["notifications"], wanted)

            def said(items) -> str:
                return ", ".join(f"{alert} by {channel} to {receiver}" for receiver, channel, alert in items) or "none"

            detail += (
                f"; delivered {said(sent)} (firing: {'yes' if arrived(summary['notifications'], wanted) else 'no'}); "
                f"expected {said(wanted)}, within {NOTIFICATION_TIMEOUT} s of the load's end"
            )
        checks.append((name, ok, detail))
    return [{"name": name, "ok": bool(ok), "detail": detail} for name, ok, detail in checks]


def summarize(
    args, *, started, ended, crashes, final, samples, access, deaths, alerts, rate_interval, notifications=None
) -> dict:
    """summary.json (docs/monitoring.md, Load-test demo, has every field)."""
    server = server_counts(samples)
    endpoints = [endpoint_row(entry, server, access) for entry in final["endpoints"]]
    total = endpoint_row(final["total"], server, access)
    names = {e["endpoint"] for e in endpoints}
    locust_answered = sum(e["requests"] - e["unanswered"] for e in endpoints)
    counted = sum(server[name] for name in names)
    logged = sum(access[name] for name in names)
    restarts = int(metric(samples, "flaskapi_worker_restarts_total"))
    tolerance = args.users + args.threads * restarts
    status_5xx = int(
        sum(v for n, labels, v in samples if n == "flask_http_request_total" and labels["status"][0] == "5")
    )
    summary = {
        "run": {
            "start": report.utc_full(started),
            "end": report.utc_full(ended),
            "start_unix": started,
            "end_unix": ended,
            "users": args.users,
            "spawn_rate": round(args.users / args.ramp, 1),
            "ramp_s": args.ramp,
            "hold_s": args.hold,
            "duration_s": args.ramp + args.hold,
            "crash_schedule_s": crashes,
            "crash_schedule": [report.utc_full(started + at) for at in crashes],
            "workers": args.workers,
            "threads": args.threads,
            "scrape_interval_s": SCRAPE_INTERVAL,
            "step_s": SCRAPE_INTERVAL,
            "rate_interval": rate_interval,
            "alertmanager": None if notifications is None else ALERTMANAGER_WAITS,
        },
        "locust": {k: v for k, v in total.items() if k not in ("endpoint", "server", "log")},
        "endpoints": endpoints,
        "counts": {
            "locust_answered": locust_answered,
            "server": counted,
            "log": logged,
            "server_other": {k: v for k, v in sorted(server.items()) if k not in names},
            "tolerance": tolerance,
            "tolerance_why": (
                f"a user cut off at the stop timeout leaves at most one request the server answered and locust "
                f"never counted ({args.users} users), and a dying worker may take up to {args.threads} answered "
                f"requests with it ({args.threads} threads x {restarts} restart(s))"
            ),
            "agree": abs(counted - locust_answered) <= tolerance and abs(logged - counted) <= tolerance,
        },
        "server": {"status_5xx": status_5xx, "worker_restarts": restarts},
        "worker_deaths": deaths,
        "alerts": alerts,
        "notifications": notifications or [],
        "slo": {"p95_ms": args.p95_slo_ms, "source": f"{LATENCY_ALERT} in {RULES.relative_to(ROOT)}"},
    }
    return summary


def markdown(summary: dict) -> str:
    """summary.md: the verdict, its checks and the requests by endpoint, for a terminal or a PR."""
    run_, counts = summary["run"], summary["counts"]
    lines = [
        f"# Load-test demo: {summary['verdict'].upper()}",
        "",
        f"{run_['start']} to {run_['end']}: {run_['users']} users (spawn rate {run_['spawn_rate']:g}/s), "
        f"{run_['duration_s']:g} s, crashes at {', '.join(f'+{s:g} s' for s in run_['crash_schedule_s']) or 'none'}, "
        f"{run_['workers']} workers x {run_['threads']} threads.",
        "",
        "| check | | measured |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {c['name']} | {'pass' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in summary["checks"]]
    head = (
        "| endpoint | requests | failures | never answered | server | log | p50 ms | p95 ms | p99 ms | max ms | req/s |"
    )
    lines += ["", head, "| --- |" + " ---: |" * 10]
    for e in [*summary["endpoints"], {**summary["locust"], "endpoint": "all", **counts}]:
        cells = [e["requests"], e["failures"], e["unanswered"], e["server"], e["log"]]
        cells += [e["p50_ms"], e["p95_ms"], e["p99_ms"], e["max_ms"], e["rps"]]
        lines.append(f"| {e['endpoint']} | " + " | ".join(report.number(c) for c in cells) + " |")
    lines += ["", f"Counts agree within {counts['tolerance']}: {counts['tolerance_why']}."]
    for death in summary["worker_deaths"]:
        lines.append(f"- worker {death['pid']} died at {death['time']} ({death['cause']})")
    for alert in summary["alerts"]:
        lines.append(f"- alert {alert['alertname']} fired {alert['start']} to {alert['end']}")
    for sent in summary["notifications"]:
        lines.append(
            f"- {sent['status']} {sent['alertname']} ({sent['severity']}) by {sent['channel']} to {sent['receiver']} "
            f"({sent['to']}), arrived {sent['arrived']}: {sent['subject'] or sent['summary']}"
        )
    shipped = summary.get("shipping")
    if shipped:
        lines += [
            "",
            f"Log shipping: {shipped['central_lines']:,} of the {shipped['local_lines']:,} lines of logs/app.log "
            f"reached the log host as {shipped['host']} (`central/app.log`).",
        ]
    sentry = summary.get("sentry")
    if sentry:
        lines += [
            "",
            f"Sentry (local receiver): {sentry['events']} events, {sentry['crash_events']} of them the crashes', "
            f"{sentry['crash_events_in_the_log']} found in the log by their trace id (`sentry-events.json`).",
        ]
    lines += [
        "",
        "Files: `dashboard.html`, `summary.json`, `locust.html`, `locust.out`, `logs/app.log`, `sentry-events.json`.",
    ]
    return "\n".join(lines) + "\n"


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--ramp", type=float, default=60, help="seconds to reach --users")
    parser.add_argument("--hold", type=float, default=30, help="seconds at full load")
    parser.add_argument("--crash-at", default="45", help="seconds after start, comma-separated; 0 = no crash")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--locust-processes",
        type=int,
        default=1,
        help="locust worker processes under one master (default 1: no master)",
    )
    parser.add_argument("--threads", type=int, default=4, help="GUNICORN_THREADS")
    parser.add_argument("--p95-slo-ms", type=float, default=None, help=f"default: {LATENCY_ALERT}'s threshold")
    parser.add_argument("--db-uri", default=None, help="a migrated database (default: flaskapi_demo, embedded)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.crashes = sorted(float(s) for s in args.crash_at.split(",") if float(s) > 0)
    if args.p95_slo_ms is None:
        args.p95_slo_ms = slo_p95_ms()
    return args


SHIPPED_HOST = "app-1"  # the demo's one app host, as the log host names it
SHIPPING_TIMEOUT = 60.0


def shipped_lines(central, log_file: Path) -> dict:
    """Wait (bounded) until the log host holds every line the app wrote, then count both: the
    local file, the central copy and the lines set aside as repeats (RELP resends)."""

    def count(path: Path) -> int:
        try:
            with open(path, "rb") as handle:
                return sum(1 for _ in handle)
        except FileNotFoundError:
            return 0

    local = count(log_file)
    try:
        wait_for(
            lambda: count(central.host_file(SHIPPED_HOST)) >= local, "the log host's copy", timeout=SHIPPING_TIMEOUT
        )
    except AssertionError as exc:
        print(f"{exc}: the summary says how many arrived", file=sys.stderr)
    return {
        "host": SHIPPED_HOST,
        "local_lines": local,
        "central_lines": count(central.host_file(SHIPPED_HOST)),
        "central_file": str(central.combined),
    }


def run_ramp(url: str, args: argparse.Namespace, out: Path, generator: dict[str, str]):
    """Headless locust against `url`: `args.users` over `args.ramp` s, then `args.hold` s, from
    `args.locust_processes` processes; its HTML report and output in `out` (the demo's and the
    fleet run's load). Returns the finished command."""
    duration = args.ramp + args.hold
    command = locust_command(
        url,
        users=args.users,
        rate=f"{args.users / args.ramp:.3f}",
        seconds=duration,
        stop_timeout=STOP_TIMEOUT,
        processes=args.locust_processes,
        extra=("--html", str(out / "locust.html")),
    )
    result = run_command(command, generator, timeout=duration + STOP_TIMEOUT + 120)
    (out / "locust.out").write_text(result.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    out = (args.out or ROOT / "reports" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        # An earlier run's Prometheus data, log and files would be read as this run's.
        print(f"{out} is not empty: give --out a new or empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    prometheus_installed = Path(Prometheus.BINARY).exists()
    if not prometheus_installed:
        print("Prometheus is not installed (Debian/Ubuntu: apt-get install prometheus): no panels.", file=sys.stderr)
    alertmanager_installed = prometheus_installed and Path(Alertmanager.BINARY).exists()
    if prometheus_installed and not alertmanager_installed:
        print(
            "Alertmanager is not installed (Debian/Ubuntu: apt-get install prometheus-alertmanager): no notifications.",
            file=sys.stderr,
        )
    sentry = SentryReceiver()  # Sentry's wire protocol on loopback: the crash reports of the run
    env = stack_env(
        args.db_uri or migrated_demo_database(),
        out,
        CRASH_ROUTE_ENABLED="1",
        LOG_CONSOLE="0",
        GUNICORN_THREADS=str(args.threads),
        SENTRY_DSN=sentry.dsn,
    )
    locust_port = free_port()
    rate_interval = report.grafana_rate_interval(SCRAPE_INTERVAL, SCRAPE_INTERVAL)
    print(f"report folder: {out}")
    with (
        sentry,
        Gunicorn(env, workers=args.workers, log_path=out / "gunicorn.out") as stack,
        contextlib.ExitStack() as monitoring,  # stopped first, in the reverse order of their start
    ):
        stack.wait_for_workers()
        print(f"API {stack.url}   metrics {stack.metrics_url}")
        central = None
        log_file = out / "logs" / "app.log"  # stack_env's LOG_DIR
        if rsyslog.installed():
            # the log shipped off the host as deployed: a forwarder on app.log, a log host in out/central
            central = monitoring.enter_context(rsyslog.shipping({SHIPPED_HOST: log_file}, out))
            print(f"log shipping: {log_file} -> {central.combined} (RELP)")
        else:
            print("rsyslog is not installed (apt-get install rsyslog rsyslog-relp): no central log.", file=sys.stderr)
        prometheus = alertmanager = None
        if alertmanager_installed:
            smtp = monitoring.enter_context(SmtpReceiver())
            hook = monitoring.enter_context(WebhookReceiver())
            alertmanager = monitoring.enter_context(
                Alertmanager(out / "alertmanager", smarthost=smtp.smarthost, webhook_url=hook.url, **ALERTMANAGER_WAITS)
            )
            print(f"Alertmanager {alertmanager.url}   mail to {smtp.smarthost}   webhooks to {hook.url}")
        if prometheus_installed:
            targets = {"flaskapi": f"127.0.0.1:{stack.metrics_port}", "locust": f"127.0.0.1:{locust_port}"}
            prometheus = monitoring.enter_context(
                Prometheus(
                    out,
                    interval=f"{SCRAPE_INTERVAL:g}s",
                    targets=targets,
                    alertmanager=alertmanager.address if alertmanager is not None else None,
                    # the SLO's long windows and budget too: once a minute or every 5 minutes, a
                    # short run would end before they were evaluated
                    every_group_at_interval=True,
                )
            )
            print(f"Prometheus {prometheus.url}")
            # two scrapes of the app before the load, so every rate has a value from the start
            wait_for(
                lambda: prometheus.query('count_over_time(up{job="flaskapi"}[1m]) >= 2'),
                "Prometheus's first two scrapes of the app",
            )

        generator = locust_env(
            LOCUST_METRICS_BIND=f"127.0.0.1:{locust_port}",
            LOCUST_SUMMARY_JSON=str(out / "locust-final.json"),
            LOCUST_CRASH_AT=",".join(f"{s:g}" for s in args.crashes),
        )
        print(
            f"locust ({args.locust_processes} process{'es' if args.locust_processes > 1 else ''}): "
            f"{args.users} users over {args.ramp:g} s, then {args.hold:g} s steady; crashes at "
            + (", ".join(f"+{s:g} s" for s in args.crashes) or "none")
        )
        started = time.time()
        result = run_ramp(stack.url, args, out, generator)
        locust_ended = time.time()
        # No request comes after locust: the server's counters are final now.
        samples = scrape(stack.metrics_url)
        if prometheus is not None:
            wait_for(
                lambda: any(
                    float(s["value"][1]) > locust_ended for s in prometheus.query('timestamp(up{job="flaskapi"})')
                ),
                "Prometheus's first scrape of the app after locust ended",
            )
        ended = time.time()
        delivered = None
        if alertmanager is not None:
            # while the app still answers scrapes (stopped, it would be an alert of its own)
            mail_receivers = alertmanager.mail_receivers()
            expected = expected_notifications(args.crashes)
            try:
                wait_for(
                    lambda: arrived(notifications(smtp, hook, mail_receivers), expected),
                    "the notifications the crashes send",
                    timeout=NOTIFICATION_TIMEOUT,
                    interval=0.2,
                )
            except AssertionError as exc:
                print(f"{exc}: the report lists those that arrived", file=sys.stderr)
            delivered = notifications(smtp, hook, mail_receivers)
        stack.stop()  # every log line written and the file closed before it is counted
        access, deaths = read_log(out / "logs" / "app.log", started, ended)
        events = sentry_events(sentry.errors())
        (out / report.SENTRY_EVENTS).write_text(json.dumps(events, indent=2) + "\n")
        shipped = shipped_lines(central, log_file) if central is not None else None
        final_path = out / "locust-final.json"
        if not final_path.exists():
            raise RuntimeError(f"locust wrote no final statistics (exit {result.returncode}):\n{result.stdout[-3000:]}")
        final = json.loads(final_path.read_text())
        alerts = firing_alerts(prometheus, started, ended, SCRAPE_INTERVAL) if prometheus is not None else []
        summary = summarize(
            args,
            started=started,
            ended=ended,
            crashes=args.crashes,
            final=final,
            samples=samples,
            access=access,
            deaths=deaths,
            alerts=alerts,
            rate_interval=rate_interval,
            notifications=delivered,
        )
        summary["shipping"] = shipped
        summary["sentry"] = sentry_summary(events, log_file)
        summary["checks"] = judge(
            summary,
            locust_exit=result.returncode,
            prometheus_ran=prometheus is not None,
            alertmanager_ran=alertmanager is not None,
        )
        summary["verdict"] = "pass" if all(c["ok"] for c in summary["checks"]) else "fail"
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(markdown(summary))
        report.render(
            prometheus,
            out,
            start=started,
            end=ended,
            step=SCRAPE_INTERVAL,
            rate_interval=rate_interval,
            summary=summary,
        )
    print(markdown(summary))
    print(f"report: {out / report.PAGE}")
    failed = [check for check in summary["checks"] if not check["ok"]]
    for check in failed:
        print(f"FAILED: {check['name']}: {check['detail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
