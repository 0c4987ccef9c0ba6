"""Reports of dying workers on a real gunicorn: a replacement never waits on Sentry, and a
worker aborted for timeout leaves the stacks of its threads (log line and Sentry event)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import requests

from bench.harness.environment import free_port, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.scrape import metric, reported_worker_pids, scrape
from bench.harness.sentry_receiver import SentryReceiver

pytestmark = pytest.mark.stack

WORKERS = 3
SLOW_SENTRY_SECONDS = 10.0


def log_lines(data_dir: Path) -> list[dict]:
    return [json.loads(line) for path in (data_dir / "logs").glob("app.log*") for line in path.read_text().splitlines()]


def replaced(stack: Gunicorn, before: set[int], gone: set[int], started: float) -> tuple[float, set[int]]:
    """(Seconds from `started` until none of `gone` is alive and WORKERS workers are, the new
    pids), polled every 20 ms, so the figure is within a poll of the truth."""

    def done():
        after = scrape(stack.metrics_url)
        pids = reported_worker_pids(after)
        if not (gone & pids) and len(pids) == WORKERS and metric(after, "flaskapi_workers_alive") == WORKERS:
            return pids
        return None

    pids = wait_for(done, f"workers {sorted(gone)} to be replaced", interval=0.02)
    return time.monotonic() - started, pids - before


def crash_one(stack: Gunicorn) -> tuple[float, int, str, set[int]]:
    """A worker crashed through /auth/crash: (seconds until replaced, its pid, the request id,
    the replacement's pid)."""
    before = reported_worker_pids(scrape(stack.metrics_url))
    request_id = f"crash-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        requests.get(stack.url + "/auth/crash", headers={"X-Request-ID": request_id}, timeout=30)
    [line] = wait_for(
        lambda: [
            x
            for x in log_lines(stack.data_dir)
            if x.get("event") == "crash_requested" and x.get("request_id") == request_id
        ],
        "the crash's log line",
    )
    assert line["pid"] in before
    seconds, new = replaced(stack, before, {line["pid"]}, started)
    return seconds, line["pid"], request_id, new


def kill(stack: Gunicorn, victims: set[int]) -> float:
    """`victims` SIGKILLed at once: seconds until all are replaced."""
    before = reported_worker_pids(scrape(stack.metrics_url))
    assert victims <= before
    started = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return replaced(stack, before, victims, started)[0]


def two_of(stack: Gunicorn, but: set[int]) -> set[int]:
    return set(sorted(reported_worker_pids(scrape(stack.metrics_url)) - but)[:2])


def start(receiver_dsn: str, data_dir: Path, migrated_database, **extra) -> Gunicorn:
    env = stack_env(
        migrated_database("test_worker_reports"),
        data_dir,
        CRASH_ROUTE_ENABLED="1",
        SENTRY_DSN=receiver_dsn,
        SENTRY_TRACES_SAMPLE_RATE="0",
        LOG_CONSOLE="0",
        **extra,
    )
    stack = Gunicorn(env, workers=WORKERS, log_path=data_dir / "gunicorn.out")
    stack.data_dir = data_dir
    return stack


def master_reports(receiver: SentryReceiver) -> list[int]:
    return [int(e["tags"]["worker_pid"]) for e in receiver.errors() if e.get("logger") == "service.workers"]


def test_a_slow_or_unreachable_sentry_does_not_delay_replacing_workers(migrated_database, tmp_path_factory):
    """The master reported each death with a blocking 2 s flush before forking the replacement,
    and the crash route flushed 2 s before dying: with a slow Sentry a crash was replaced after
    4.5 s, two simultaneous deaths after 4.2 s. Now both take as long as with a healthy Sentry
    (plus the crash route's 0.5 s bound), and no report is lost or sent twice. A closed port is
    refused at once: never the slow case, run to show it stays so."""
    figures: dict[str, dict[str, float]] = {}

    # (a) healthy: the baseline, and every report arrives, once
    data_dir = tmp_path_factory.mktemp("healthy")
    with SentryReceiver() as receiver, start(receiver.dsn, data_dir, migrated_database) as stack:
        stack.wait_for_workers()
        crash_s, crashed, request_id, _ = crash_one(stack)
        killed = two_of(stack, but=set())
        double_s = kill(stack, killed)
        figures["healthy"] = {"crash": crash_s, "two deaths": double_s}
        receiver.wait_for(lambda e: e.get("tags", {}).get("request_id") == request_id)  # the dying worker's own
        receiver.wait_for(lambda e: e.get("logger") == "service.workers", count=3)
        assert sorted(master_reports(receiver)) == sorted({crashed} | killed), receiver.errors()

    # (b) slow: answers every envelope 10 s late; (c) unreachable: nothing listens on the port
    with SentryReceiver(delay=SLOW_SENTRY_SECONDS) as slow:
        unreachable = f"http://publickey@127.0.0.1:{free_port()}/1"
        for name, dsn in (("slow", slow.dsn), ("unreachable", unreachable)):
            data_dir = tmp_path_factory.mktemp(name)
            with start(dsn, data_dir, migrated_database) as stack:
                stack.wait_for_workers()
                crash_s, _, _, first = crash_one(stack)
                double_s = kill(stack, two_of(stack, but=first))
                figures[name] = {"crash": crash_s, "two deaths": double_s}
                if name == "slow":
                    # With `first` replaced too, every worker was forked while the master's reports
                    # were queued behind its first 10 s send. A worker that kept that copy of the
                    # queue sent those reports again, ahead of its own event, which its 0.5 s
                    # bound then lost.
                    kill(stack, first)
                    _, _, request_id, _ = crash_one(stack)
                    slow.wait_for(lambda e, r=request_id: e.get("tags", {}).get("request_id") == r, timeout=30)
                    reports = master_reports(slow)
                    assert sorted(reports) == sorted(set(reports)), f"a death was reported twice: {reports}"
    print(f"\nreplacement seconds: {figures}")
    for name in ("slow", "unreachable"):
        for what in ("crash", "two deaths"):
            assert figures[name][what] < figures["healthy"][what] + 1.0, (name, what, figures)
            assert figures[name][what] < 2.0, (name, what, figures)


def test_a_worker_stuck_past_the_timeout_leaves_its_stack(migrated_database, tmp_path):
    """A sync worker held past GUNICORN_TIMEOUT in Python (the test-only sleep route): the
    master aborts it, and before it dies it writes where every thread was, with the request id
    it was serving, as one ERROR line and a Sentry event. The master's own report follows."""
    request_id = f"stuck-{uuid.uuid4().hex[:12]}"
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    with SentryReceiver() as receiver:
        env = stack_env(
            migrated_database("test_worker_stacks"),
            tmp_path,
            FLASK_ENV="testing",  # the sleep route exists only there
            GUNICORN_THREADS="1",
            GUNICORN_TIMEOUT="2",
            LOG_CONSOLE="0",
            SENTRY_DSN=receiver.dsn,
            SENTRY_TRACES_SAMPLE_RATE="0",
        )
        with Gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.out") as stuck:
            with pytest.raises(requests.ConnectionError):  # aborted after 2 s, however slow the box
                requests.get(
                    stuck.url + "/_test/sleep",
                    params={"seconds": 60},
                    headers={"X-Request-ID": request_id, "traceparent": traceparent},
                    timeout=90,
                )
            wait_for(
                lambda: metric(scrape(stuck.metrics_url), "flaskapi_worker_exits_total", cause="timeout") >= 1,
                "a timeout exit to be counted",
            )
            assert requests.get(stuck.url + "/healthz", timeout=5).status_code == 200
            [event] = receiver.wait_for(lambda e: e.get("tags", {}).get("cause") == "timeout" and e.get("threads"))
            receiver.wait_for(lambda e: e.get("logger") == "service.workers" and not e.get("threads"))  # the master's

    [line] = [x for x in log_lines(tmp_path) if x.get("event") == "worker_timeout"]
    assert line["level"] == "ERROR" and line["request_id"] == request_id
    assert line["trace_id"] == trace_id and line["trace_ids"] == [trace_id]  # the caller's trace
    [serving] = [t for t in line["threads"] if t["request_id"] == request_id]
    functions = [f["function"] for f in serving["frames"]]
    assert functions[-1] == "sleep_for_test", functions  # where it hung, innermost last
    assert "in sleep_for_test" in serving["stack"] and "time.sleep(seconds)" in serving["stack"]
    assert "handle_abort" not in functions  # the stack as the signal found it, not the handler's
    assert {x["cause"] for x in log_lines(tmp_path) if x.get("event") == "worker_died"} == {"timeout"}

    assert event["tags"]["request_id"] == request_id and str(event["tags"]["worker_pid"]) == str(line["pid"])
    assert event["level"] == "error"
    assert event["contexts"]["trace"]["trace_id"] == trace_id
    assert event["contexts"]["trace"]["parent_span_id"] == "00f067aa0ba902b7"
    [thread] = [t for t in event["threads"]["values"] if t["crashed"]]
    assert thread["stacktrace"]["frames"][-1]["function"] == "sleep_for_test"
    assert "threads" not in event.get("extra", {})
