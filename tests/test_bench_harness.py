"""The benchmark harness itself works (the figures live in `make bench`, not here): its load
runner, its crash-recovery probe and its verdicts. Speed is not asserted."""
from __future__ import annotations

import pytest

from bench import run
from tests.conftest import stack_env
from tests.stack import Gunicorn

pytestmark = pytest.mark.stack


def test_locust_runner_counts_requests_and_generator_cpu(migrated_database, tmp_path):
    env = stack_env(migrated_database("test_bench_runner"), tmp_path, LOG_CONSOLE="0")
    with Gunicorn(env, workers=2, log_path=tmp_path / "g.out") as stack:
        result = run.locust(stack.url, "ListUser", users=4, rate=4, seconds=3, workdir=tmp_path, tag="t")
    assert result["requests"] > 50 and result["failures"] == 0
    assert result["rps"] == round(result["requests"] / 3, 1)
    assert 0 < result["generator_cpu_pct"] <= 200
    assert {name for _, name, _, _ in result["records"]} == {"GET /books/"}


def test_crash_recovery_probe_measures_a_real_restart(migrated_database, tmp_path):
    figures = run.crash_recovery(migrated_database("test_bench_crash"), tmp_path, 2)
    assert figures["crashes"] == 2
    assert 0 < figures["median_ms"] <= figures["max_ms"] < 10_000
    log = (tmp_path / "logs" / "app.log").read_text()
    assert log.count('"event": "worker_died"') == 2


def test_verdicts_compare_ratios_from_one_run_with_the_targets():
    endpoint = {"requests": 10, "p50_ms": 5.0, "p95_ms": 80.0, "p99_ms": 150.0}
    results = {
        "lesson": {"users": 10, "requests": 100, "rps": 5.0, "failures": 0, "generator_cpu_pct": 3.0,
                   "endpoints": {"GET /books/": endpoint, "POST /auth/login": {**endpoint, "p95_ms": 310.0}}},
        "saturation": {"stack": {"list_rps": 1000.0, "create_rps": 600.0},
                       "flask_run": {"list_rps": 400.0, "create_rps": 300.0},
                       "reference": {"list_rps": 1500.0, "create_rps": 1200.0}},
        "observability": {"on": {"list_rps": 950.0, "create_rps": 500.0},
                          "off": {"list_rps": 1000.0, "create_rps": 600.0}},
        "growth": {size: {page: {"p50_ms": ms} for page in ("first_page", "middle_page")}
                   for size, ms in (("1000", 1.0), ("100000", 1.1), ("1000000", 1.4))},
        "crash": {"crashes": 5, "median_ms": 20.0, "max_ms": 30.0},
    }
    rows = {figure: (value, verdict) for figure, value, verdict in run.table(results)}
    assert rows["1 GET /books/"][1].endswith("HOLDS")
    assert rows["1 POST /auth/login"][1] == "p95 <= 300 ms: MISSED"
    assert rows["2 list: stack / flask run"] == ("2.50x", ">= 2.5x: HOLDS")
    assert rows["2 create: stack / reference"] == ("0.50x", ">= 0.6x: MISSED")
    assert rows["3 list: observability on / off"][1] == ">= 0.90: HOLDS"
    assert rows["3 create: observability on / off"][1] == ">= 0.90: MISSED"
    assert rows["4 first_page p50 at 1k / 100k / 1M books"][1] == "1M/1k <= 1.3: MISSED"
    assert rows["5 crash to serving again (5 crashes)"][1] == "<= 100 ms: HOLDS"
