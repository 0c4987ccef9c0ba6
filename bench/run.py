"""`make bench` / `make bench-quick`: the lesson's outage, measured on this machine, with ratios
taken side by side in one run (the box is noisy; compare ratios, not absolute figures).

Scenarios: 1 the lesson's users at scale, 2 saturation against `flask run` and a bare reference
app, 3 observability on/off, 4 list latency as the table grows, 5 crash to serving again, 6 the
lesson's users spawned in a burst, with the hashing bulkhead off and on, 7 the edge's cost:
the same requests through nginx and straight at gunicorn. `--locust-processes N` drives the
locust scenarios from N locust worker processes under one master.
Prints one table and writes results.json / results.csv / ramp.png to bench/results/<time>/.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

from bench.harness.environment import ROOT, free_port, locust_command, locust_env, stack_env
from bench.harness.gunicorn import GUNICORN, Gunicorn
from bench.harness.nginx import Nginx
from bench.harness.process import ManagedProcess
from bench.harness.scrape import metric, scrape
from bench.harness.sentry_receiver import SentryReceiver

LOCUSTFILE = ROOT / "bench" / "locustfile_bench.py"
SHIPPED = None  # the worker count deploy/gunicorn.conf.py chooses (WEB_CONCURRENCY or cores + 1)
SCENARIOS = ["lesson", "spawn", "saturation", "observability", "edge", "crash", "growth"]
LOCUST_PROCESSES = 1  # --locust-processes: locust's workers under one master (1: a single process)
PYTHON = sys.executable


# --- the database -------------------------------------------------------------------------
def dev_server():
    """A handle on the embedded development Postgres (`make run`'s), started if needed."""
    from service import devdb
    from service.settings import Settings

    return devdb.server(devdb.pgdata_for(Settings.from_env({"FLASK_ENV": "development"}).data_dir))


def fresh_database(name: str) -> str:
    """Drop and recreate `name` on the embedded Postgres, migrate it, return its URI."""
    from service import devdb

    handle = dev_server()
    handle.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')
    uri = devdb.create_database(handle, name)
    cli(uri, "db", "upgrade")
    return uri


def cli(uri: str, *args: str) -> None:
    subprocess.run(
        [PYTHON, "-m", "flask", *args],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "DB_URI": uri, "FLASK_ENV": "development", "LOG_TO_FILE": "0", "LOG_LEVEL": "WARNING"},
    )


def seed(uri: str, books: int) -> None:
    cli(uri, "db-custom", "seed", "--users", "20", "--books", str(books))
    from sqlalchemy import create_engine, text

    engine = create_engine(uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE books"))
    engine.dispose()


# --- servers ------------------------------------------------------------------------------
class Server(ManagedProcess):
    """Any other server the bench compares (flask run, the reference app) on a free loopback
    port, ready when it lists books."""

    ready_timeout = 30.0

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(
            argv, env={**os.environ, **env}, log_path=log, name=" ".join(argv[:4]), ready_url=self.url + "/books/"
        )


def flask_run(uri: str, workdir: Path) -> Server:
    port = free_port()
    return Server(
        [PYTHON, "-m", "flask", "run", "--with-threads", "-p", str(port)],
        stack_env(uri, workdir, LOG_CONSOLE="0"),
        workdir / "flask-run.out",
        port,
    )


def reference(uri: str, workdir: Path) -> Server:
    port = free_port()
    return Server(
        [str(GUNICORN), "-w", "3", "-b", f"127.0.0.1:{port}", "--no-control-socket", "bench.reference_app:app"],
        {"DB_URI": uri},
        workdir / "reference.out",
        port,
    )


# --- load ---------------------------------------------------------------------------------
def watch_generator(generator: ManagedProcess, *, limit: float) -> tuple[float, float]:
    """Start a load generator and wait for it to finish, reading its CPU time as it goes (the
    last reading before it exits; a locust master's workers included, live or reaped); stop it
    and fail after `limit` seconds. Returns (CPU s, wall s)."""
    generator.start()
    try:
        watched = psutil.Process(generator.pid)
        started = time.monotonic()
        cpu = 0.0
        while generator.poll() is None:
            try:
                times = watched.cpu_times()
                live = sum(sum(child.cpu_times()[:2]) for child in watched.children(recursive=True))
                cpu = max(cpu, times.user + times.system + times.children_user + times.children_system + live)
            except psutil.Error:
                pass
            if time.monotonic() - started > limit:
                raise RuntimeError(f"{generator.name} overran {limit:.0f}s")
            time.sleep(0.25)
        return cpu, time.monotonic() - started
    finally:
        generator.stop(10)  # only returns its status once it has exited; else stops it (overrun, ^C)


def locust(host: str, user: str, *, users: int, rate: float, seconds: float, workdir: Path, tag: str) -> dict:
    """Run headless locust; return its aggregate figures, the generator's CPU and the records."""
    records = workdir / f"{tag}-records.json"
    argv = locust_command(
        host,
        users=users,
        rate=rate,
        seconds=seconds,
        locustfile=LOCUSTFILE,
        user_classes=(user,),
        processes=LOCUST_PROCESSES,
        extra=("--csv", str(workdir / tag), "--loglevel", "WARNING"),
    )
    env = locust_env(BENCH_RECORDS=str(records), LOCUST_METRICS_BIND="off")
    generator = ManagedProcess(argv, env=env, log_path=workdir / f"{tag}-locust.out", name=f"locust {user}")
    cpu, elapsed = watch_generator(generator, limit=seconds + 90)
    data = [tuple(r) for r in json.loads(records.read_text())] if records.exists() else []
    ok = [r for r in data if r[3]]
    return {
        "requests": len(data),
        "failures": len(data) - len(ok),
        "rps": round(len(data) / seconds, 1),
        "generator_cpu_pct": round(100 * cpu / elapsed, 1),
        "records": data,
    }


WRK = "wrk"
WRK_SCRIPT = ROOT / "bench" / "wrk_books.lua"
CONNECTIONS = 16


def wrk(
    url: str, *, seconds: float, workdir: Path, tag: str, token: str | None = None, connections: int = CONNECTIONS
) -> dict:
    """Saturate `url` with wrk (GET /books/, or POST /books/ as `token`'s owner when given);
    return its figures, its CPU seconds and its share of a core. wrk is a C client with one
    thread: at 2,500 req/s it needs about a tenth of the CPU locust's FastHttpUser does, and on
    a 2-core box every cycle the generator takes is a cycle the server under test loses."""
    argv = [WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(WRK_SCRIPT)]
    log = workdir / f"{tag}-wrk.txt"
    log.unlink(missing_ok=True)  # the log is appended to: a rerun into the same folder starts afresh
    generator = ManagedProcess(
        [*argv, url.rstrip("/") + "/books/"],
        env={**os.environ, "WRK_TOKEN": token or ""},
        log_path=log,
        name=f"wrk {tag}",
    )
    cpu, elapsed = watch_generator(generator, limit=seconds + 30)
    return parse_wrk(generator.output()) | {"cpu_s": cpu, "generator_cpu_pct": round(100 * cpu / elapsed, 1)}


def parse_wrk(output: str) -> dict:
    """requests, failures (non-2xx/3xx answers and socket errors), rps and p50/p99 from wrk's text
    (and p95, which bench/wrk_books.lua prints)."""
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", output)
    if done is None:
        raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")
    requests_done = int(done.group(1))
    seconds = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    failures = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sockets:
        failures += sum(int(n) for n in sockets.groups())
    latency = {
        q: _wrk_ms(m.group(1), m.group(2))
        for q, m in ((q, re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)", output, re.M)) for q in ("50", "99"))
        if m
    }
    p95 = re.search(r"^p95 latency: (\d+) us$", output, re.M)
    if p95:
        latency["95"] = round(int(p95.group(1)) / 1000, 2)
    return {
        "requests": requests_done,
        "failures": failures,
        "seconds": seconds,
        "rps": round(requests_done / seconds, 1),
        **{f"p{q}_ms": ms for q, ms in latency.items()},
    }


def _wrk_ms(value: str, unit: str) -> float:
    return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 2)


def login(url: str) -> str:
    """Register a fresh user and return its token (the reference app answers with a dummy)."""
    creds = {"email": f"bench-{uuid.uuid4().hex}@example.com", "password": "bench-password"}
    requests.post(url + "/auth/register", json=creds, timeout=30)
    response = requests.post(url + "/auth/login", json=creds, timeout=30)
    response.raise_for_status()
    return response.json()["token"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def latency(url: str, n: int) -> dict:
    """Sequential single requests on fresh connections, as a client sees one page."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    times = []
    for _ in range(n):
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        times.append((time.perf_counter() - started) * 1000)
        connection.close()
        assert response.status == 200, response.status
    return {"p50_ms": pct(times, 0.5), "p95_ms": pct(times, 0.95)}


# --- scenarios ----------------------------------------------------------------------------
def lesson_at_scale(uri: str, workdir: Path, quick: bool) -> dict:
    users, rate, steady = (200, 10, 15) if quick else (1000, 10, 60)
    with Gunicorn(stack_env(uri, workdir, LOG_CONSOLE="0"), workers=SHIPPED, log_path=workdir / "lesson.out") as stack:
        result = locust(
            stack.url,
            "LessonFastUser",
            users=users,
            rate=rate,
            seconds=users / rate + steady,
            workdir=workdir,
            tag="lesson",
        )
        limiter = limiter_cost(scrape(stack.metrics_url))
    endpoints = per_endpoint(result["records"])
    plot_ramp(result["records"], workdir / "ramp.png", users=users, rate=rate)
    return {
        "users": users,
        "spawn_rate": rate,
        "steady_s": steady,
        "requests": result["requests"],
        "failures": result["failures"],
        "rps": result["rps"],
        "generator_cpu_pct": result["generator_cpu_pct"],
        "endpoints": endpoints,
        "limiter": limiter,
    }


def per_endpoint(records: list) -> dict[str, dict]:
    """Requests and exact p50/p95/p99 (ms) per endpoint, from locust's per-request records."""
    by_endpoint: dict[str, list[float]] = {}
    for _, name, ms, _ok in records:
        by_endpoint.setdefault(name, []).append(ms)
    return {
        name: {"requests": len(v), "p50_ms": pct(v, 0.5), "p95_ms": pct(v, 0.95), "p99_ms": pct(v, 0.99)}
        for name, v in sorted(by_endpoint.items())
    }


# Without the bulkhead: gunicorn's own gthread worker (hashes on the request threads, as before).
SPAWN_VARIANTS = {"without bulkhead": {"GUNICORN_CMD_ARGS": "--worker-class=gthread"}, "with bulkhead": {}}


def spawn_burst(uri: str, workdir: Path, quick: bool) -> dict:
    """The lesson's user spawned fast (200 users at 20/s, 45 s): every new user costs two argon2
    hashes, about 40 a second against the ~10-15 the box can do. Run with the hashing bulkhead
    off, then on (shipped config otherwise), each on a fresh stack; the books latency through
    the burst is plotted for both."""
    users, rate, seconds = (100, 20, 20) if quick else (200, 20, 45)
    variants = {}
    for label, extra in SPAWN_VARIANTS.items():
        tag = "spawn-" + label.replace(" ", "-")
        env = stack_env(uri, workdir, LOG_CONSOLE="0", **extra)
        with Gunicorn(env, workers=SHIPPED, log_path=workdir / f"{tag}.out") as stack:
            result = locust(
                stack.url, "LessonFastUser", users=users, rate=rate, seconds=seconds, workdir=workdir, tag=tag
            )
            samples = scrape(stack.metrics_url)
        variants[label] = {
            "requests": result["requests"],
            "failures": result["failures"],
            "shed": int(metric(samples, "flaskapi_hash_shed_total")),
            "endpoints": per_endpoint(result["records"]),
            "records": result["records"],
        }
    plot_spawn(variants, workdir / "spawn.png", users=users, rate=rate)
    for figures in variants.values():
        figures.pop("records")
    return {"users": users, "spawn_rate": rate, "seconds": seconds, "variants": variants}


def limiter_cost(samples) -> dict:
    """What the login and registration limits cost each request of the run, measured in the
    service (flaskapi_throttle_store_seconds: statement plus connection checkout, under the
    run's load): mean milliseconds per register and per login (check, plus undo on success)."""

    def total(operation: str, suffix: str) -> float:
        return metric(samples, f"flaskapi_throttle_store_seconds_{suffix}", operation=operation)

    def p95_bound(operation: str) -> float | None:
        """The upper bound of the bucket that holds the 95th percentile (ms)."""
        buckets = sorted(
            (float(labels["le"]), value)
            for name, labels, value in samples
            if name == "flaskapi_throttle_store_seconds_bucket" and labels.get("operation") == operation
        )
        count = buckets[-1][1] if buckets else 0
        return next((1000 * le for le, below in buckets if below >= 0.95 * count), None) if count else None

    registers, logins = total("register", "count"), total("login_check", "count")
    login_seconds = total("login_check", "sum") + total("login_success", "sum")
    return {
        "registers": int(registers),
        "logins": int(logins),
        "register_ms": round(1000 * total("register", "sum") / registers, 2) if registers else None,
        "login_ms": round(1000 * login_seconds / logins, 2) if logins else None,
        "login_check_p95_ms_at_most": p95_bound("login_check"),
    }


def side_by_side(servers: dict[str, object], workdir: Path, seconds: float, tag: str) -> dict:
    """List and create throughput of every server, in interleaved rounds: all servers run at
    once (idle ones cost nothing) and each round loads them in turn, the order rotating, so the
    box's drift over a run lands on every server alike. `seconds` per server and kind."""
    rounds = max(2, round(seconds / 3))
    figures: dict[str, dict] = {name: {} for name in servers}
    tokens = {name: login(server.url) for name, server in servers.items()}
    for key in ("list", "create"):
        totals = {name: {"requests": 0, "failures": 0, "seconds": 0.0, "cpu_s": 0.0} for name in servers}
        per_round: dict[str, list[float]] = {name: [] for name in servers}
        p95_per_round: dict[str, list[float]] = {name: [] for name in servers}
        order = list(servers)
        for round_no in range(rounds):
            for name in order:
                run = wrk(
                    servers[name].url,
                    seconds=seconds / rounds,
                    workdir=workdir,
                    tag=f"{tag}-{name}-{key}-{round_no}",
                    token=tokens[name] if key == "create" else None,
                )
                for field in totals[name]:
                    totals[name][field] += run[field]
                per_round[name].append(run["rps"])
                p95_per_round[name].append(run.get("p95_ms", float("nan")))
            order = order[1:] + order[:1]
        for name, total in totals.items():
            figures[name].update(
                {
                    f"{key}_rps": round(total["requests"] / total["seconds"], 1),
                    f"{key}_round_rps": per_round[name],
                    f"{key}_round_p95_ms": p95_per_round[name],
                    f"{key}_requests": total["requests"],
                    f"{key}_failures": total["failures"],
                    f"{key}_generator_cpu_pct": round(100 * total["cpu_s"] / total["seconds"], 1),
                }
            )
    return figures


def round_ratios(a: dict, b: dict, key: str, figure: str = "rps") -> list[float]:
    """a's throughput (or another per-round `figure`: "p95_ms") over b's, round by round (the
    two measured in the same round)."""
    return [x / y for x, y in zip(a[f"{key}_round_{figure}"], b[f"{key}_round_{figure}"], strict=False)]


def paired_ratio(a: dict, b: dict, key: str, figure: str = "rps") -> float:
    """The median over rounds of a's throughput over b's in the same round: a disturbance on
    the shared box (a few seconds of someone else's CPU) spoils one round, not the figure."""
    return statistics.median(round_ratios(a, b, key, figure))


def spread(a: dict, b: dict, key: str, figure: str = "rps") -> str:
    """The rounds' lowest and highest ratio, so a reader can tell a change from the noise."""
    ratios = round_ratios(a, b, key, figure)
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f} (n={len(ratios)})"


def saturation(uri: str, workdir: Path, seconds: float) -> dict:
    """Our stack (shipped config), the same app under `flask run`, and the bare reference."""
    with (
        Gunicorn(stack_env(uri, workdir, LOG_CONSOLE="0"), workers=SHIPPED, log_path=workdir / "sat.out") as stack,
        flask_run(uri, workdir) as flask_dev,
        reference(uri, workdir) as floor,
    ):
        return side_by_side({"stack": stack, "flask_run": flask_dev, "reference": floor}, workdir, seconds, "sat")


def observability_overhead(uri: str, workdir: Path, seconds: float) -> dict:
    """The shipped stack with JSON logs, metrics and Sentry (to a local receiver, tracing at the
    shipped default) against the same stack with all three off."""
    with SentryReceiver() as receiver:
        on = {"SENTRY_DSN": receiver.dsn}
        off = {"METRICS_ENABLED": "0", "LOG_TO_FILE": "0", "LOG_CONSOLE": "0", "LOG_LEVEL": "WARNING"}
        with (
            Gunicorn(stack_env(uri, workdir, **on), workers=SHIPPED, log_path=workdir / "obs-on.out") as stack_on,
            Gunicorn(stack_env(uri, workdir, **off), workers=SHIPPED, log_path=workdir / "obs-off.out") as stack_off,
        ):
            figures = side_by_side({"on": stack_on, "off": stack_off}, workdir, seconds, "obs")
        figures["sentry_events_received"] = len(receiver.events)
    return figures


def edge_cost(uri: str, workdir: Path, seconds: float) -> dict:
    """The same list and create requests straight at gunicorn (shipped config) and through nginx
    in front of that same gunicorn (the project's site rendered for loopback, as `make run-edge`
    serves it: access log, request id, keep-alive upstream), in interleaved rounds."""
    env = stack_env(uri, workdir, LOG_CONSOLE="0", TRUSTED_PROXIES="1")  # one proxy hop, as deployed
    with (
        Gunicorn(env, workers=SHIPPED, log_path=workdir / "edge.out") as stack,
        Nginx(workdir / "edge-nginx", upstream=f"127.0.0.1:{stack.port}") as edge,
    ):
        return side_by_side({"nginx": edge, "straight": stack}, workdir, seconds, "edge")


def growth(uri: str, workdir: Path, samples: int) -> dict:
    figures = {}
    seeded = 0
    for size in (1_000, 100_000, 1_000_000):
        seed(uri, size - seeded)
        seeded = size
        with Gunicorn(
            stack_env(uri, workdir, LOG_CONSOLE="0"), workers=SHIPPED, log_path=workdir / "growth.out"
        ) as stack:
            first = requests.get(stack.url + "/books/?limit=20", timeout=10).json()
            middle = first["items"][0]["id"] // 2
            figures[str(size)] = {
                "first_page": latency(stack.url + "/books/", samples),
                "middle_page": latency(stack.url + f"/books/?cursor={middle}", samples),
            }
    return figures


def crash_recovery(uri: str, workdir: Path, crashes: int) -> dict:
    times = []
    env = stack_env(uri, workdir, LOG_CONSOLE="0", CRASH_ROUTE_ENABLED="1")
    with Gunicorn(env, workers=1, log_path=workdir / "crash.out") as stack:
        for _ in range(crashes):
            time.sleep(0.5)
            started = time.perf_counter()
            with contextlib.suppress(requests.ConnectionError):
                requests.get(stack.url + "/auth/crash", timeout=10)
            while True:  # the master keeps the socket: this waits in the backlog for the new worker
                try:
                    if requests.get(stack.url + "/healthz", timeout=10).status_code == 200:
                        break
                except requests.ConnectionError:
                    continue
            times.append((time.perf_counter() - started) * 1000)
    return {"crashes": crashes, "median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}


# --- output -------------------------------------------------------------------------------
def per_second(records: list, *, start: float) -> dict[int, list[float]]:
    """Response times (ms) by whole second since `start`, from locust's per-request records."""
    buckets: dict[int, list[float]] = {}
    for ts, _, ms, _ in records:
        buckets.setdefault(int(ts - start), []).append(ms)
    return buckets


def plot_ramp(records: list, path: Path, *, users: int, rate: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    buckets = per_second(records, start=min(r[0] for r in records))
    seconds = sorted(buckets)
    figure, axes = plt.subplots(figsize=(9, 3.5))
    for q, label in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        axes.plot(seconds, [pct(buckets[s], q) for s in seconds], label=label)
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("response time (ms)")
    axes.set_title(f"Lesson scenario: {users} users spawned at {rate:g}/s, then steady")
    users_axis = axes.twinx()
    users_axis.plot(seconds, [min(users, rate * s) for s in seconds], color="grey", linestyle=":", label="users")
    users_axis.set_ylabel("users")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_spawn(variants: dict[str, dict], path: Path, *, users: int, rate: float) -> None:
    """Books p95 per second through the burst, one line per variant, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3.5))
    for label, figures in variants.items():
        books = [r for r in figures["records"] if " /books/" in r[1]]
        if not books:
            continue
        buckets = per_second(books, start=min(r[0] for r in figures["records"]))
        seconds = sorted(buckets)
        axes.plot(seconds, [pct(buckets[s], 0.95) for s in seconds], label=f"books p95, {label}")
    axes.axhline(50, color="grey", linestyle="--", linewidth=1, label="target 50 ms")
    axes.axvspan(0, users / rate, color="orange", alpha=0.1, label=f"spawning {users} users at {rate:g}/s")
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("books response time, p95 per second (ms)")
    axes.set_ylim(bottom=0)
    axes.set_title("Spawn burst: book requests while new users hash their passwords")
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def table(results: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target verdict) rows of the scenarios that ran; ratios are computed here
    from one run's figures."""
    return [row for name, rows_of in ROWS.items() if name in results for row in rows_of(results[name])]


def _lesson_rows(lesson: dict) -> list[tuple[str, str, str]]:
    rows = []
    rows.append(
        (
            f"1 lesson: {lesson['users']} users, {lesson['requests']} requests",
            f"{lesson['rps']} req/s",
            f"failures {lesson['failures']} (target 0): {'HOLDS' if lesson['failures'] == 0 else 'MISSED'}",
        )
    )
    rows.append(("1 load generator CPU", f"{lesson['generator_cpu_pct']} % of a core", ""))
    limiter = lesson.get("limiter") or {}
    if limiter.get("logins"):
        rows.append(
            (
                "1 login limits, time in the store",
                f"{limiter['login_ms']} ms a login, {limiter['register_ms']} ms a registration (mean)",
                f"login check p95 <= {limiter['login_check_p95_ms_at_most']} ms; {limiter['logins']} logins",
            )
        )
    for name, e in lesson["endpoints"].items():
        limit = 300 if "/auth/" in name else 100
        rows.append(
            (
                f"1 {name}",
                f"p50 {e['p50_ms']} / p95 {e['p95_ms']} / p99 {e['p99_ms']} ms",
                f"p95 <= {limit} ms: {'HOLDS' if e['p95_ms'] <= limit else 'MISSED'}",
            )
        )
    return rows


def _spawn_rows(spawn: dict) -> list[tuple[str, str, str]]:
    rows = []
    for label, figures in spawn["variants"].items():
        rows.append(
            (
                f"6 spawn {spawn['users']} users at {spawn['spawn_rate']}/s {label}: {figures['requests']} requests",
                f"shed {figures['shed']}",
                f"failures {figures['failures']} (target 0): {'HOLDS' if figures['failures'] == 0 else 'MISSED'}",
            )
        )
        for name, e in figures["endpoints"].items():
            books = "/books/" in name
            rows.append(
                (
                    f"6 {label}: {name}",
                    f"p50 {e['p50_ms']} / p95 {e['p95_ms']} / p99 {e['p99_ms']} ms",
                    f"p95 <= 50 ms: {'HOLDS' if e['p95_ms'] <= 50 else 'MISSED'}" if books else "reported",
                )
            )
    return rows


def _saturation_rows(sat: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key in ("list", "create"):
        a, b, c = sat["stack"][f"{key}_rps"], sat["flask_run"][f"{key}_rps"], sat["reference"][f"{key}_rps"]
        a_b, a_c = paired_ratio(sat["stack"], sat["flask_run"], key), paired_ratio(sat["stack"], sat["reference"], key)
        rows.append(
            (
                f"2 {key}: stack / flask run / reference",
                f"{a} / {b} / {c} req/s",
                _failures(sat[n].get(f"{key}_failures") for n in ("stack", "flask_run", "reference")),
            )
        )
        rows.append(
            (
                f"2 {key}: wrk CPU (stack / flask run / reference)",
                " / ".join(
                    f"{sat[n].get(f'{key}_generator_cpu_pct', '?')}" for n in ("stack", "flask_run", "reference")
                )
                + " % of a core",
                "",
            )
        )
        rows.append(
            (
                f"2 {key}: stack / flask run (median of rounds)",
                f"{a_b:.2f}x, {spread(sat['stack'], sat['flask_run'], key)}",
                f">= 2.5x: {'HOLDS' if a_b >= 2.5 else 'MISSED'}",
            )
        )
        rows.append(
            (
                f"2 {key}: stack / reference (median of rounds)",
                f"{a_c:.2f}x, {spread(sat['stack'], sat['reference'], key)}",
                f">= 0.6x: {'HOLDS' if a_c >= 0.6 else 'MISSED'}",
            )
        )
    return rows


def _failures(counts) -> str:
    total = sum(n or 0 for n in counts)
    return "no failed request" if total == 0 else f"{total} FAILED requests"


def _observability_rows(obs: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key in ("list", "create"):
        on, off = obs["on"][f"{key}_rps"], obs["off"][f"{key}_rps"]
        ratio = paired_ratio(obs["on"], obs["off"], key)
        rows.append(
            (
                f"3 {key}: observability on / off (median of rounds)",
                f"{on} / {off} req/s: {ratio:.2f}, {spread(obs['on'], obs['off'], key)}",
                f">= 0.90: {'HOLDS' if ratio >= 0.90 else 'MISSED'}",
            )
        )
    return rows


def _edge_rows(edge: dict) -> list[tuple[str, str, str]]:
    """nginx's cost as ratios to straight: throughput (below 1 is the cost) and p95 (above 1)."""
    rows = []
    via, straight = edge["nginx"], edge["straight"]
    for key in ("list", "create"):
        rps_ratio, p95_ratio = paired_ratio(via, straight, key), paired_ratio(via, straight, key, "p95_ms")
        rows.append(
            (
                f"7 {key}: through nginx / straight, throughput (median of rounds)",
                f"{via[f'{key}_rps']} / {straight[f'{key}_rps']} req/s: {rps_ratio:.2f}, {spread(via, straight, key)}",
                _failures(edge[n].get(f"{key}_failures") for n in ("nginx", "straight")),
            )
        )
        rows.append(
            (
                f"7 {key}: through nginx / straight, p95 (median of rounds)",
                f"{statistics.median(via[f'{key}_round_p95_ms']):.1f} / "
                f"{statistics.median(straight[f'{key}_round_p95_ms']):.1f} ms: {p95_ratio:.2f}, "
                f"{spread(via, straight, key, 'p95_ms')}",
                "reported",
            )
        )
    return rows


def _growth_rows(grow: dict) -> list[tuple[str, str, str]]:
    rows = []
    for page in ("first_page", "middle_page"):
        small, big = grow["1000"][page]["p50_ms"], grow["1000000"][page]["p50_ms"]
        rows.append(
            (
                f"4 {page} p50 at 1k / 100k / 1M books",
                f"{small} / {grow['100000'][page]['p50_ms']} / {big} ms = {big / small:.2f}",
                f"1M/1k <= 1.3: {'HOLDS' if big / small <= 1.3 else 'MISSED'}",
            )
        )
    return rows


def _crash_rows(crash: dict) -> list[tuple[str, str, str]]:
    rows = []
    rows.append(
        (
            f"5 crash to serving again ({crash['crashes']} crashes)",
            f"median {crash['median_ms']} / max {crash['max_ms']} ms",
            f"<= 100 ms: {'HOLDS' if crash['max_ms'] <= 100 else 'MISSED'}",
        )
    )
    return rows


ROWS = {
    "lesson": _lesson_rows,
    "spawn": _spawn_rows,
    "saturation": _saturation_rows,
    "observability": _observability_rows,
    "edge": _edge_rows,
    "growth": _growth_rows,
    "crash": _crash_rows,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller scales, under 3 minutes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--only", nargs="+", choices=SCENARIOS, default=SCENARIOS, help="run these scenarios only (default: all)"
    )
    parser.add_argument(
        "--locust-processes",
        type=int,
        default=1,
        help="locust worker processes under one master for the locust scenarios (default 1: no master)",
    )
    args = parser.parse_args()
    global LOCUST_PROCESSES
    LOCUST_PROCESSES = args.locust_processes
    # A TERM (a timeout, a Ctrl-C in another terminal) unwinds like an exception, so every
    # `with` of a scenario stops its gunicorn, locust and wrk instead of orphaning them.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    quick = args.quick
    workdir = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = 6 if quick else 15
    began = time.monotonic()
    results = {
        "machine": {
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "memory_gib": round(psutil.virtual_memory().total / 2**30),
        },
        "mode": "quick" if quick else "full",
    }

    uri = fresh_database("flaskapi_bench") if set(args.only) - {"growth"} else ""
    if uri:
        seed(uri, 10_000)
    runs = {
        "lesson": lambda: lesson_at_scale(uri, workdir, quick),
        "spawn": lambda: spawn_burst(uri, workdir, quick),
        "saturation": lambda: saturation(uri, workdir, seconds),
        "observability": lambda: observability_overhead(uri, workdir, seconds),
        "edge": lambda: edge_cost(uri, workdir, seconds),
        "crash": lambda: crash_recovery(uri, workdir, 5),
        "growth": lambda: growth(fresh_database("flaskapi_bench_growth"), workdir, 100 if quick else 300),
    }
    for name in SCENARIOS:  # in this order: the growth scenario's million rows come last
        if name in args.only:
            print(f"[{time.monotonic() - began:5.0f}s] {name} ...", flush=True)
            results[name] = runs[name]()
    results["seconds"] = round(time.monotonic() - began)

    rows = table(results)
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(
        f"\nflaskapi-observability bench ({results['mode']}, {results['machine']['cores']} cores, "
        f"{results['seconds']} s)"
    )
    for figure, value, verdict in rows:
        print(f"  {figure:<{width}}  {value:<{value_width}}  {verdict}")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    with open(workdir / "results.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("figure", "value", "target"), *rows])
    print(f"\nresults: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
