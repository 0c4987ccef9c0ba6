"""Load scenarios. `QuickstartUser` is the lesson's user, call for call: register + login on
start, then list / create (x3) / update (x2) / delete (x2) books, waiting 1-4 s between tasks.
One change: every request is named by its route (`/books/[id]`, not `/books/1234`), so locust's
statistics, its CSV and the exporter below hold one series per endpoint whatever the ids are
(a new series per id starts at 1 and `rate()` never sees its first step). The lesson's file,
verbatim, is bench/lesson_locustfile.py; it still runs against the service (tests/test_edge.py).

    locust -f locustfile.py --host http://127.0.0.1:5000

The load generator's own view (users, requests, failures, response-time percentiles) is served
for Prometheus on LOCUST_METRICS_BIND (default 127.0.0.1:9646), so dashboards can lay the load
over the server's behaviour. LOCUST_CRASH_AT=20 (or 20,40) calls /auth/crash once at each of those
seconds after the test starts (the server needs CRASH_ROUTE_ENABLED=1). LOCUST_SUMMARY_JSON=path
writes locust's final statistics there once it has stopped (every user done or cut off at the
stop timeout): per request name its count, failures, the answers by status (0: none, the
connection broke) and percentiles, the numbers of locust's final table (its CSV is written
every few seconds and may miss the last ones).

With `--processes N` (locust's master and N worker processes: one process tops out near a core)
the master alone serves the metrics and writes the final statistics; the workers' requests reach
it in their reports (`gather_on_master`), and at the run's end it stops the workers and waits for
their last reports before it quits (`drain_workers`): locust itself gives them half a second.
"""

import collections
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
import uuid

import gevent
from faker import Faker
from locust import HttpUser, between, events, task
from locust.rpc import Message
from locust.runners import MasterRunner, WorkerRunner
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("locustfile")

BOOK_ROUTE = "/books/[id]"  # the request name for every /books/<id>: one statistics row, whatever the id


class QuickstartUser(HttpUser):
    wait_time = between(1, 4)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.books = []
        self.faker = Faker()
        self.token = None

    def on_start(self):
        id = str(uuid.uuid4())
        while self.token == None:  # noqa: E711 (kept as the lesson wrote it)
            try:
                self.client.post("/auth/register", json={"email": f"test{id}@test.com", "password": "secret"})
                response = self.client.post("/auth/login", json={"email": f"test{id}@test.com", "password": "secret"})
                self.token = response.json()["token"]
            except:  # noqa: E722 (kept as the lesson wrote it)
                time.sleep(3)

    @task
    def index_page(self):
        self.client.get("/books/")

    @task(3)
    def create_book(self):
        if self.token:
            response = self.client.post(
                "/books/", json={"title": self.faker.catch_phrase()}, headers={"Authorization": f"Bearer {self.token}"}
            )
            if response.status_code < 400:
                self.books.append(response.json()["id"])

    @task(2)
    def update_book(self):
        if len(self.books) > 0 and self.token:
            book_id = random.choice(self.books)
            self.client.put(
                f"/books/{book_id}",
                json={"title": self.faker.catch_phrase()},
                headers={"Authorization": f"Bearer {self.token}"},
                name=BOOK_ROUTE,
            )

    @task(2)
    def delete_book(self):
        if len(self.books) > 0 and self.token:
            book_id = random.choice(self.books)
            response = self.client.delete(
                f"/books/{book_id}", headers={"Authorization": f"Bearer {self.token}"}, name=BOOK_ROUTE
            )
            if response.status_code < 400:
                self.books.remove(book_id)


class LocustCollector:
    """Reads locust's own statistics at scrape time (on the master, they are aggregated)."""

    QUANTILES = (0.5, 0.95, 0.99)

    def __init__(self, environment):
        self.environment = environment

    def collect(self):
        runner = self.environment.runner
        stats = runner.stats if runner else None
        yield GaugeMetricFamily("locust_users", "Simulated users running", value=runner.user_count if runner else 0)
        if isinstance(runner, MasterRunner):
            yield GaugeMetricFamily("locust_workers", "Worker processes connected", value=runner.worker_count)
            per_worker = CounterMetricFamily(
                "locust_worker_requests", "Requests sent, by the worker process that sent them", labels=["worker"]
            )
            for worker, count in sorted(WORKER_REQUESTS.items()):
                per_worker.add_metric([str(worker)], count)
            yield per_worker
        requests = CounterMetricFamily("locust_requests", "Requests sent", labels=["method", "name"])
        failures = CounterMetricFamily("locust_failures", "Requests that failed", labels=["method", "name"])
        percentiles = GaugeMetricFamily(
            "locust_response_time_seconds",
            "Response time percentiles over the last seconds (all requests)",
            labels=["quantile"],
        )
        if stats is not None:
            for entry in stats.entries.values():
                requests.add_metric([entry.method or "", entry.name], entry.num_requests)
                failures.add_metric([entry.method or "", entry.name], entry.num_failures)
            for quantile in self.QUANTILES:
                value = stats.total.get_current_response_time_percentile(quantile)
                if value is not None:
                    percentiles.add_metric([str(quantile)], value / 1000.0)
        yield requests
        yield failures
        yield percentiles


@events.init.add_listener
def serve_metrics(environment, **kwargs):
    if isinstance(environment.runner, WorkerRunner):
        return  # with --processes, the master serves the aggregated view
    bind = os.environ.get("LOCUST_METRICS_BIND", "127.0.0.1:9646")
    if bind in ("", "0", "off"):
        return
    host, _, port = bind.rpartition(":")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(LocustCollector(environment))
    start_http_server(int(port), addr=host, registry=registry)


@events.test_start.add_listener
def schedule_crashes(environment, **kwargs):
    if isinstance(environment.runner, WorkerRunner) or not os.environ.get("LOCUST_CRASH_AT"):
        return
    delays = sorted(float(s) for s in os.environ["LOCUST_CRASH_AT"].split(","))

    def crash_later():
        started = time.monotonic()
        for delay in delays:
            gevent.sleep(max(0.0, delay - (time.monotonic() - started)))
            try:
                urllib.request.urlopen(environment.host.rstrip("/") + "/auth/crash", timeout=10)  # noqa: S310 (the --host URL)
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                log.info("crash requested at +%.0fs: %s", delay, exc)  # the worker died mid-request

    gevent.spawn(crash_later)


def gather_on_master(key: str, take, merge) -> None:
    """With --processes the requests run in the workers: every report a worker sends the master
    (every 3 s, and a last one when it stops) carries what `take()` hands over since the last,
    and the master `merge`s it, so the master's end-of-run files count every worker's requests."""

    def send(data, **kwargs):  # fired in a worker only
        data[key] = take()

    def receive(data, **kwargs):  # fired in the master only
        if key in data:
            merge(data[key])

    events.report_to_master.add_listener(send)
    events.worker_report.add_listener(receive)


WORKER_REQUESTS: collections.Counter = collections.Counter()  # on the master: worker index -> requests
_environments = []  # this process's locust environment, once it is made (the report events carry none)


@events.init.add_listener
def remember_environment(environment, **kwargs):
    _environments.append(environment)


@events.worker_report.add_listener
def count_worker_requests(client_id, data, **kwargs):
    """Each report's requests (a worker reports those since its last), by the worker's index."""
    runner = _environments[-1].runner if _environments else None
    if isinstance(runner, MasterRunner) and "stats_total" in data:
        WORKER_REQUESTS[runner.get_worker_index(client_id)] += data["stats_total"]["num_requests"]


@events.test_stopping.add_listener
def drain_workers(environment, **kwargs):
    """On the master when the run ends, before its own `quit`: ask every worker to quit and wait
    (up to the stop timeout and a minute) until each has said it did. A worker stops its users,
    sends its last report, then says so, in that order on one connection: once none is left,
    every request is in the master's statistics. Locust's own quit waits half a second."""
    runner = environment.runner
    if not isinstance(runner, MasterRunner) or not runner.clients.all:
        return
    for client in runner.clients.all:
        runner.server.send_to_client(Message("quit", None, client.id))
    deadline = time.monotonic() + (environment.stop_timeout or 0) + 60
    while runner.clients.all and time.monotonic() < deadline:
        gevent.sleep(0.2)


# Answers by status per (method, name), 0 for a request that got none (a reset or refused
# connection): locust's statistics count those as failures without saying which they were.
# Counted where the requests run and gathered on the master with --processes.
ANSWERS: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)


@events.request.add_listener
def count_answers(request_type, name, response=None, **kwargs):
    ANSWERS[(request_type, name)][getattr(response, "status_code", 0) or 0] += 1


def _take_answers() -> list[list]:
    taken = [[method, name, status, n] for (method, name), counts in ANSWERS.items() for status, n in counts.items()]
    ANSWERS.clear()
    return taken


def _merge_answers(answers: list[list]) -> None:
    for method, name, status, n in answers:
        ANSWERS[(method, name)][status] += n


gather_on_master("answers", _take_answers, _merge_answers)


def final_entry(entry, answers: collections.Counter) -> dict:
    return {
        "method": entry.method,
        "name": entry.name,
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "answers": {str(status): count for status, count in sorted(answers.items())},
        "median_ms": entry.median_response_time,
        "avg_ms": entry.avg_response_time,
        "min_ms": entry.min_response_time,
        "max_ms": entry.max_response_time,
        "p50_ms": entry.get_response_time_percentile(0.5),
        "p95_ms": entry.get_response_time_percentile(0.95),
        "p99_ms": entry.get_response_time_percentile(0.99),
        "rps": entry.total_rps,
        "failures_per_s": entry.total_fail_per_sec,
    }


@events.quitting.add_listener
def write_final_stats(environment, **kwargs):
    """At locust's exit, after the run stopped: nothing can be added to the statistics."""
    path = os.environ.get("LOCUST_SUMMARY_JSON")
    if not path or isinstance(environment.runner, WorkerRunner):
        return
    stats = environment.runner.stats
    final = {
        "endpoints": [
            final_entry(entry, ANSWERS[(entry.method, entry.name)])
            for entry in stats.entries.values()
            if entry.num_requests
        ],
        "total": final_entry(stats.total, sum(ANSWERS.values(), collections.Counter())),
        "errors": [
            {"method": e.method, "name": e.name, "error": str(e.error), "occurrences": e.occurrences}
            for e in stats.errors.values()
        ],
        "start_time": stats.total.start_time,
        "last_request_time": stats.total.last_request_timestamp,
    }
    with open(path, "w") as handle:
        json.dump(final, handle, indent=2)
