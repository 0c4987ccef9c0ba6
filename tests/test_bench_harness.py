"""The benchmark harness itself works (the figures live in `make bench`, not here): its load
runner, its crash-recovery probe and its verdicts. Speed is not asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from bench import demo, run
from bench.harness.environment import ROOT, free_port, locust_command, locust_env, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from bench.harness.scrape import metric, scrape

pytestmark = pytest.mark.stack

BIN = Path(sys.executable).parent  # the venv running the tests


@pytest.fixture(scope="module")
def bench_stack(migrated_database, tmp_path_factory):
    """One stack for both runners (cheap hashing: the harness is tested, not the hash cost)."""
    uri = migrated_database("test_bench_runners")
    workdir = tmp_path_factory.mktemp("bench")
    env = stack_env(uri, workdir, LOG_CONSOLE="0", PASSWORD_HASH_MEMORY_KIB="8192", PASSWORD_HASH_TIME_COST="1")
    with Gunicorn(env, workers=2, log_path=workdir / "g.out") as stack:
        yield uri, stack


def test_locust_runner_plays_the_lesson_user_and_counts_generator_cpu(bench_stack, tmp_path):
    _, stack = bench_stack
    result = run.locust(stack.url, "LessonFastUser", users=6, rate=6, seconds=4, workdir=tmp_path, tag="t")
    names = [name for _, name, _, _ in result["records"]]
    # every user registers and logs in on start, then runs the lesson's tasks
    assert names.count("POST /auth/register") == 6 and names.count("POST /auth/login") == 6
    assert set(names) - {"POST /auth/register", "POST /auth/login"} <= {
        "GET /books/",
        "POST /books/",
        "PUT /books/[id]",
        "DELETE /books/[id]",
    }
    assert result["failures"] == 0 and result["requests"] == len(names)
    assert 0 < result["generator_cpu_pct"] <= 200


def test_wrk_runner_reports_what_the_server_stored(bench_stack, tmp_path):
    """wrk's count of answered creates is checked against the rows the database holds (the
    lesson user's books have other titles)."""
    uri, stack = bench_stack
    listed = run.wrk(stack.url, seconds=1, workdir=tmp_path, tag="list", connections=4)
    created = run.wrk(stack.url, seconds=1, workdir=tmp_path, tag="create", connections=4, token=run.login(stack.url))
    # How many requests fit in the second is the machine's speed: only that some were answered.
    assert listed["requests"] > 0 and listed["failures"] == 0 and 0 < listed["generator_cpu_pct"] <= 100
    assert listed["rps"] == round(listed["requests"] / listed["seconds"], 1)
    assert 0 < listed["p50_ms"] <= listed["p95_ms"] <= listed["p99_ms"]  # p95 from bench/wrk_books.lua
    assert created["requests"] > 0 and created["failures"] == 0
    engine = create_engine(uri)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM books WHERE title = 'benchmark book'")).scalar()
    engine.dispose()
    # every answered create is stored; at most one per connection was still in flight at the end
    assert created["requests"] <= stored <= created["requests"] + 4


def test_wrk_output_with_failures_is_parsed():
    output = """Running 2s test @ http://127.0.0.1:1/books/
  Latency Distribution
     50%  812.00us
     99%    1.20s
  1000 requests in 2.00s, 1.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:    500.00
"""
    assert run.parse_wrk(output) == {
        "requests": 1000,
        "failures": 10,
        "seconds": 2.0,
        "rps": 500.0,
        "p50_ms": 0.81,
        "p99_ms": 1200.0,
    }


def test_edge_scenario_loads_one_gunicorn_through_nginx_and_straight_in_rounds(bench_stack, tmp_path):
    """The edge's cost at tiny scale: both paths answer every list and create in each round,
    and the table gives throughput and p95 ratios with their spread over the rounds."""
    uri, _ = bench_stack
    figures = run.edge_cost(uri, tmp_path, seconds=2)
    for path in ("nginx", "straight"):
        for key in ("list", "create"):
            assert figures[path][f"{key}_requests"] > 0 and figures[path][f"{key}_failures"] == 0
            assert len(figures[path][f"{key}_round_p95_ms"]) == 2 and all(
                ms > 0 for ms in figures[path][f"{key}_round_p95_ms"]
            )
    # nginx's access log holds the requests that went through it, and only those
    access = (tmp_path / "edge-nginx" / "logs" / "flaskapi.access.log").read_text().splitlines()
    books = figures["nginx"]["list_requests"] + figures["nginx"]["create_requests"]
    # wrk's 4 runs through nginx (2 rounds, list and create) each leave up to a connection's
    # request in flight at its end; and the registration and login
    assert books <= len(access) <= books + 4 * run.CONNECTIONS + 2
    rows = {figure: value for figure, value, _ in run.table({"edge": figures})}
    assert "(n=2)" in rows["7 list: through nginx / straight, throughput (median of rounds)"]
    assert "(n=2)" in rows["7 create: through nginx / straight, p95 (median of rounds)"]


def test_crash_recovery_probe_measures_a_real_restart(migrated_database, tmp_path):
    figures = run.crash_recovery(migrated_database("test_bench_crash"), tmp_path, 2)
    assert figures["crashes"] == 2
    assert 0 < figures["median_ms"] <= figures["max_ms"] < 10_000
    log = (tmp_path / "logs" / "app.log").read_text()
    assert log.count('"event": "worker_died"') == 2


def test_verdicts_compare_ratios_from_one_run_with_the_targets():
    endpoint = {"requests": 10, "p50_ms": 5.0, "p95_ms": 80.0, "p99_ms": 150.0}

    def side(list_rounds, create_rounds):
        return {
            "list_rps": sum(list_rounds) / len(list_rounds),
            "list_round_rps": list_rounds,
            "create_rps": sum(create_rounds) / len(create_rounds),
            "create_round_rps": create_rounds,
        }

    results = {
        "lesson": {
            "users": 10,
            "requests": 100,
            "rps": 5.0,
            "failures": 0,
            "generator_cpu_pct": 3.0,
            "endpoints": {"GET /books/": endpoint, "POST /auth/login": {**endpoint, "p95_ms": 310.0}},
        },
        "saturation": {
            "stack": side([1000.0] * 3, [600.0] * 3),
            "flask_run": side([400.0] * 3, [300.0] * 3),
            "reference": side([1500.0] * 3, [1200.0] * 3),
        },
        # one spoiled round: the median of the paired ratios decides, not the totals
        "observability": {"on": side([900.0, 100.0, 920.0], [500.0] * 3), "off": side([1000.0] * 3, [600.0] * 3)},
        "growth": {
            size: {page: {"p50_ms": ms} for page in ("first_page", "middle_page")}
            for size, ms in (("1000", 1.0), ("100000", 1.1), ("1000000", 1.4))
        },
        "crash": {"crashes": 5, "median_ms": 20.0, "max_ms": 30.0},
        "spawn": {
            "users": 200,
            "spawn_rate": 20,
            "seconds": 45,
            "variants": {
                "with bulkhead": {
                    "requests": 900,
                    "failures": 0,
                    "shed": 0,
                    "endpoints": {
                        "GET /books/": {**endpoint, "p95_ms": 49.0},
                        "POST /books/": {**endpoint, "p95_ms": 51.0},
                        "POST /auth/login": {**endpoint, "p95_ms": 900.0},
                    },
                }
            },
        },
    }
    rows = {
        figure.replace(" (median of rounds)", ""): (value, verdict) for figure, value, verdict in run.table(results)
    }
    assert rows["1 GET /books/"][1].endswith("HOLDS")
    assert rows["1 POST /auth/login"][1] == "p95 <= 300 ms: MISSED"
    assert rows["2 list: stack / flask run"] == ("2.50x, rounds 2.50-2.50 (n=3)", ">= 2.5x: HOLDS")
    assert rows["2 create: stack / reference"] == ("0.50x, rounds 0.50-0.50 (n=3)", ">= 0.6x: MISSED")
    # the spoiled round shows in the spread, not in the median
    assert rows["3 list: observability on / off"] == (
        "640.0 / 1000.0 req/s: 0.90, rounds 0.10-0.92 (n=3)",
        ">= 0.90: HOLDS",
    )
    assert rows["3 create: observability on / off"][1] == ">= 0.90: MISSED"
    assert rows["4 first_page p50 at 1k / 100k / 1M books"][1] == "1M/1k <= 1.3: MISSED"
    assert rows["5 crash to serving again (5 crashes)"][1] == "<= 100 ms: HOLDS"
    assert rows["6 spawn 200 users at 20/s with bulkhead: 900 requests"] == (
        "shed 0",
        "failures 0 (target 0): HOLDS",
    )
    assert rows["6 with bulkhead: GET /books/"][1] == "p95 <= 50 ms: HOLDS"
    assert rows["6 with bulkhead: POST /books/"][1] == "p95 <= 50 ms: MISSED"
    assert rows["6 with bulkhead: POST /auth/login"][1] == "reported"  # auth absorbs the queueing


def test_make_locust_runs_the_projects_locustfile_against_the_service(bench_stack, tmp_path):
    """`make locust` (the README's way to load the service without finding .venv/bin/locust),
    headless here through LOCUST_ARGS: every user registers and logs in, nothing fails."""
    _, stack = bench_stack
    args = f"--headless -u 3 -r 3 -t 3s --only-summary --csv {tmp_path / 'run'}"
    env = {**locust_env(), "LOCUST_METRICS_BIND": "off"}
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            "install",
            "locust",
            f"BIN={BIN}",
            f"LOCUST_HOST={stack.url}",
            f"LOCUST_ARGS={args}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "run_stats.csv", newline="") as handle:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}
    assert int(rows[("POST", "/auth/login")]["Request Count"]) == 3
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0


def test_distributed_locust_counts_every_workers_requests_on_the_master(bench_stack, tmp_path):
    """`--processes 2`: the master alone serves :9646 (a worker binding it too would fail to
    start), its metrics count the requests of both workers, and its final statistics (CSV and
    summary) hold every request the server answered: the last reports are not lost at the end."""
    _, stack = bench_stack
    before = sum(demo.server_counts(scrape(stack.metrics_url)).values())
    metrics_port = free_port()
    argv = locust_command(stack.url, users=4, rate=4, seconds=8, processes=2, extra=("--csv", str(tmp_path / "run")))
    env = locust_env(LOCUST_METRICS_BIND=f"127.0.0.1:{metrics_port}", LOCUST_SUMMARY_JSON=str(tmp_path / "final.json"))
    seen: dict[str, float] = {}

    def both_workers_sent_requests() -> bool:
        try:
            samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        except requests.RequestException:
            return False
        per_worker = {labels["worker"]: v for n, labels, v in samples if n == "locust_worker_requests_total"}
        seen.update(workers=metric(samples, "locust_workers"), users=metric(samples, "locust_users"))
        return len(per_worker) == 2 and all(v > 0 for v in per_worker.values())

    with ManagedProcess(argv, env=env, log_path=tmp_path / "locust.out", name="locust --processes 2") as generator:
        wait_for(both_workers_sent_requests, "requests from both workers in the master's metrics", timeout=60)
        assert seen == {"workers": 2, "users": 4}
        wait_for(lambda: generator.poll() is not None, "locust to finish", timeout=90)
    assert generator.poll() == 0, generator.output()[-3000:]
    answered = sum(demo.server_counts(scrape(stack.metrics_url)).values()) - before
    with open(tmp_path / "run_stats.csv", newline="") as handle:
        total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    final = json.loads((tmp_path / "final.json").read_text())
    assert int(total["Request Count"]) == final["total"]["requests"] == answered
    assert int(total["Failure Count"]) == 0
    assert sum(final["total"]["answers"].values()) == answered  # the workers' answers, gathered
