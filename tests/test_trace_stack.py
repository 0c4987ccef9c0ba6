"""One trace id across every signal, on real gunicorn workers, a local Sentry and a real
Prometheus with exemplar storage: the caller's `traceparent` on the log lines, the Sentry event,
the error body and `traceresponse`; malformed ones start a new trace and are no error; the
latency histogram's exemplars reach Prometheus and lead to access lines of their bucket; a
worker's exemplar file leaves with the worker."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from bench import report
from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from bench.harness.scrape import reported_worker_pids, scrape
from bench.harness.sentry_receiver import SentryReceiver
from service.observability import exemplars
from service.observability.metrics import LATENCY_BUCKETS

pytestmark = pytest.mark.stack

WORKERS = 3
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
LATENCY_BUCKET = exemplars.LATENCY_METRIC + "_bucket"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"

# (why, traceparent): each one is ignored, and the request served under a new trace
MALFORMED = [
    ("unknown version ff", f"ff-{TRACE_ID}-{PARENT_ID}-01"),
    ("version 00 with a field more", f"{TRACEPARENT}-extra"),
    ("all-zero trace id", f"00-{'0' * 32}-{PARENT_ID}-01"),
    ("all-zero parent id", f"00-{TRACE_ID}-{'0' * 16}-01"),
    ("upper-case hex", f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"),
    ("not hex", f"00-{'g' * 32}-{PARENT_ID}-01"),
    ("trace id too short", f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01"),
    ("too long", TRACEPARENT + "0"),
    ("empty", ""),
    ("a space in it", f"00-{TRACE_ID} -{PARENT_ID}-01"),
    ("two joined", f"{TRACEPARENT},{TRACEPARENT}"),
    ("a huge value", "00-" + "a" * 7000),
]


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("trace")
    with SentryReceiver() as receiver:
        env = stack_env(
            migrated_database("test_trace"),
            data_dir,
            FLASK_ENV="testing",  # /_test/sleep and /_test/error
            SENTRY_DSN=receiver.dsn,
            SENTRY_TRACES_SAMPLE_RATE="0",
        )
        with Gunicorn(env, workers=WORKERS, log_path=data_dir / "gunicorn.out") as stack:
            stack.wait_for_workers()
            stack.receiver = receiver
            stack.log_file = data_dir / "logs" / "app.log"
            yield stack


def records(stack) -> list[dict]:
    return [json.loads(line) for line in stack.log_file.read_text().splitlines() if line.strip()]


def access_lines(stack, request_id: str) -> list[dict]:
    return [r for r in records(stack) if r.get("event") == "access" and r.get("request_id") == request_id]


def test_a_callers_traceparent_is_on_the_log_lines_the_sentry_event_the_error_body_and_traceresponse(stack):
    response = requests.get(
        stack.url + "/_test/error",
        headers={
            "traceparent": TRACEPARENT,
            "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            "X-Request-ID": "trace-err-1",
        },
        timeout=10,
    )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["trace_id"] == TRACE_ID and error["request_id"] == "trace-err-1"
    version, trace_id, span_id, flags = response.headers["traceresponse"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert len(span_id) == 16 and span_id != PARENT_ID and int(span_id, 16) != 0

    lines = wait_for(
        lambda: (
            [r for r in records(stack) if r.get("request_id") == "trace-err-1" and r.get("event") == "access"]
            and [r for r in records(stack) if r.get("request_id") == "trace-err-1"]
        ),
        "the request's log lines",
    )
    assert {r["event"] for r in lines} >= {"unhandled_exception", "access"}
    assert all(r["trace_id"] == TRACE_ID for r in lines)

    [event] = stack.receiver.wait_for(lambda e: e.get("tags", {}).get("request_id") == "trace-err-1")
    trace = event["contexts"]["trace"]
    assert trace["trace_id"] == TRACE_ID
    assert trace["span_id"] == span_id and trace["parent_span_id"] == PARENT_ID
    assert trace["data"]["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert event["request"]["headers"]["Traceparent"] == TRACEPARENT


@pytest.mark.parametrize("why, traceparent", MALFORMED, ids=[why for why, _ in MALFORMED])
def test_a_malformed_traceparent_starts_a_new_trace_and_is_no_error(stack, why, traceparent):
    request_id = f"trace-bad-{MALFORMED.index((why, traceparent))}"
    response = requests.get(
        stack.url + "/books/999999",
        headers={"traceparent": traceparent, "tracestate": "rojo=1", "X-Request-ID": request_id},
        timeout=10,
    )
    assert response.status_code == 404  # the route's own answer, not a 400 or a 5xx
    trace_id = response.json()["error"]["trace_id"]
    assert len(trace_id) == 32 and trace_id != TRACE_ID and int(trace_id, 16) != 0
    assert response.headers["traceresponse"].startswith(f"00-{trace_id}-")
    assert response.headers["traceresponse"].endswith("-00")  # a trace started here: not sampled upstream
    [line] = wait_for(lambda: access_lines(stack, request_id), "the access line")
    assert line["trace_id"] == trace_id and line["status"] == 404


def test_a_huge_tracestate_is_dropped_and_the_trace_continued(stack):
    """A tracestate far past the specification's 512 characters (nearly gunicorn's 8190-byte
    field limit): served as usual, in the caller's trace. (Its Sentry event would be held back
    as a repeat of the first test's; test_sentry.py and test_trace_context.py check the state
    is not kept.)"""
    huge = ",".join(f"k{i}=" + "v" * 60 for i in range(120))[:8000]
    response = requests.get(
        stack.url + "/books/999999",
        headers={"traceparent": TRACEPARENT, "tracestate": huge, "X-Request-ID": "trace-huge-state"},
        timeout=10,
    )
    assert response.status_code == 404 and response.json()["error"]["trace_id"] == TRACE_ID
    [line] = wait_for(lambda: access_lines(stack, "trace-huge-state"), "the access line")
    assert line["trace_id"] == TRACE_ID and "v" * 60 not in json.dumps(line)


def test_a_request_without_traceparent_gets_a_new_trace_of_its_own(stack):
    answers = [requests.get(stack.url + "/books/999999", timeout=10) for _ in range(5)]
    trace_ids = {a.json()["error"]["trace_id"] for a in answers}
    assert len(trace_ids) == 5


def openmetrics_exemplars(stack) -> dict[tuple, object]:
    """(labels without le, le) -> exemplar, from the master's OpenMetrics answer."""
    response = requests.get(stack.metrics_url, headers={"Accept": OPENMETRICS}, timeout=10)
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    found = {}
    for family in openmetrics_families(response.text):
        for sample in family.samples:
            if sample.exemplar is not None:
                assert sample.name == LATENCY_BUCKET
                found[tuple(sorted(sample.labels.items()))] = sample.exemplar
    return found


def exemplar_files(stack) -> list[Path]:
    return sorted(Path(stack.metrics_dir).glob(exemplars.PREFIX + "*"))


def test_the_master_serves_exemplars_in_openmetrics_and_none_in_the_classic_format(stack):
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda i: requests.get(stack.url + "/books/999999", timeout=10), range(30)))
    found = wait_for(lambda: openmetrics_exemplars(stack), "exemplars in the OpenMetrics answer")
    for labels, exemplar in found.items():
        assert exemplar.value <= float(dict(labels)["le"])
        assert set(exemplar.labels) <= {"trace_id", "request_id"} and len(exemplar.labels["trace_id"]) == 32
    classic = requests.get(stack.metrics_url, timeout=10)
    assert classic.headers["Content-Type"].startswith("text/plain")
    assert " # {" not in classic.text and "trace_id" not in classic.text
    # one file per live worker that served a request, never more than the workers
    assert 1 <= len(exemplar_files(stack)) <= WORKERS


def test_prometheus_stores_exemplars_that_lead_to_access_lines_of_their_bucket(stack, tmp_path):
    with Prometheus(tmp_path, targets={"flaskapi": stack.metrics_url.split("/")[2]}, interval="1s") as prometheus:
        started = time.time()
        # bounded load over several workers, at durations that fall in different buckets
        seconds = [0, 0.012, 0.03, 0.06, 0.12, 0.2] * 8

        def call(i: int) -> int:
            return requests.get(
                stack.url + "/_test/sleep",
                params={"seconds": seconds[i]},
                headers={"X-Request-ID": f"ex-{i}"},
                timeout=30,
            ).status_code

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert set(pool.map(call, range(len(seconds)))) == {200}
        query = f'{LATENCY_BUCKET}{{route="/_test/sleep"}}'

        def stored():
            series = prometheus.query_exemplars(query, started - 60, time.time() + 60)
            found = [(s["seriesLabels"], e) for s in series for e in s["exemplars"]]
            return found if len({labels["le"] for labels, _ in found}) >= 3 else None

        found = wait_for(stored, "exemplars of at least 3 buckets in Prometheus")
        # the demo report's section: the slowest buckets' exemplars, each with its log lines
        slowest = report.slowest_exemplars(prometheus, stack.log_file, start=started - 60, end=time.time() + 60)
        section = report.exemplar_section(slowest)
    access = {r["trace_id"]: r for r in records(stack) if r.get("event") == "access"}
    bounds = sorted([*LATENCY_BUCKETS, math.inf])
    for labels, exemplar in found:
        line = access[exemplar["labels"]["trace_id"]]  # every trace id is a request's
        assert line["request_id"] == exemplar["labels"]["request_id"]
        assert line["route"] == "/_test/sleep"
        le = float(labels["le"])
        lower = max([b for b in bounds if b < le], default=0.0)
        assert lower < line["duration_ms"] / 1000 <= le, (labels, line)
        assert float(exemplar["value"]) == pytest.approx(line["duration_ms"] / 1000)
    top = max(float(labels["le"]) for labels, _ in found)
    assert slowest and float(slowest[0]["le"]) == top
    assert [e["seconds"] for e in slowest] == sorted((e["seconds"] for e in slowest), reverse=True)
    for shown in slowest:
        assert "access" in {r["event"] for r in shown["log_lines"]}
        assert shown["trace_id"] in section and shown["request_id"] in section


def test_a_killed_workers_exemplar_file_goes_and_the_files_stay_one_per_live_worker(stack):
    for _ in range(4):  # workers killed mid-life, one after another
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda i: requests.get(stack.url + "/books/999999", timeout=10), range(30)))
        victims = wait_for(lambda: [p for p in exemplar_files(stack) if p.name.endswith(".json")], "a worker's file")
        victim = int(victims[0].name[len(exemplars.PREFIX) : -len(".json")])
        os.kill(victim, signal.SIGKILL)
        gone = Path(exemplars.path_of(stack.metrics_dir, victim))
        wait_for(lambda gone=gone: not gone.exists(), f"{gone.name} removed once its worker was reaped")
        stack.wait_for_workers()
        live = reported_worker_pids(scrape(stack.metrics_url))
        assert victim not in live
        owners = {int(p.name[len(exemplars.PREFIX) :].split(".")[0]) for p in exemplar_files(stack)}
        assert owners <= live
        assert len(exemplar_files(stack)) <= WORKERS
