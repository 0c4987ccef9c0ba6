"""The gunicorn master's metrics endpoint (METRICS_BIND).

It serves every live worker's multiprocess samples and the dead workers' totals
(sample_files.py) merged, with the live workers' exemplars on the latency buckets (exemplars.py;
OpenMetrics only, when the scraper's Accept asks for it), plus what only the master knows:
worker exits and restarts, the workers alive, build info, whether the database answers, and the
standard `process_*` series for the master and each live worker, labelled `pid` and `role`
(multiprocess mode has no process collector: prometheus_client's would describe only the
process serving the scrape).

Served by prometheus_client's WSGI app on the stdlib's wsgiref server, as its
`start_http_server` does, but with a request handler that names itself `Server:
flaskapi-metrics` (wsgiref says `WSGIServer/0.2 CPython/3.11.7`: the exact Python on the host) and
the response headers every answer of the service carries (security_headers.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import threading
import time
from collections import Counter as Tally
from collections import deque
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, make_server

import psutil
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.observability import exemplars, sample_files
from service.observability.sample_files import DeadWorkers
from service.observability.worker_exits import STOPPED
from service.security_headers import SecurityHeaders

log = logging.getLogger("service.workers")

SERVER = "flaskapi-metrics"  # the `Server` header: no software name or version
# How far back flaskapi_workers_alive_lowest looks: the scrape interval of monitoring/prometheus.yml,
# so every scrape sees the dips since the one before (a dead worker is replaced in milliseconds,
# between two scrapes, so flaskapi_workers_alive itself never shows one).
LOWEST_WINDOW_SECONDS = 5.0


class MasterMetrics(Collector):
    """Series only the master can produce, computed at scrape time."""

    def __init__(self, server, *, version: str, database_probe) -> None:
        self.server = server
        self.version = version
        self.database_probe = database_probe
        self.exits: Tally[str] = Tally()
        self._dips: deque[tuple[float, int]] = deque()  # (monotonic time, workers alive just after a reap)
        self._dips_lock = threading.Lock()

    def worker_reaped(self, cause: str) -> None:
        """Called by the arbiter once it has reaped a worker and before it forks a replacement:
        counts the exit and keeps the moment the worker was missing."""
        self.exits[cause] += 1
        with self._dips_lock:
            self._forget_old_dips()  # bounded even if nothing scrapes during a crash loop
            self._dips.append((time.monotonic(), len(self.server.WORKERS)))

    def lowest_alive(self, alive: int) -> int:
        """Fewest workers alive over the last LOWEST_WINDOW_SECONDS, `alive` (now) included."""
        with self._dips_lock:
            self._forget_old_dips()
            return min([alive] + [count for _, count in self._dips])

    def _forget_old_dips(self) -> None:
        horizon = time.monotonic() - LOWEST_WINDOW_SECONDS
        while self._dips and self._dips[0][0] < horizon:
            self._dips.popleft()

    def collect(self):
        info = GaugeMetricFamily(
            "flaskapi_build_info", "Version and configured worker count", labels=["version", "workers"]
        )
        info.add_metric([self.version, str(self.server.num_workers)], 1)
        yield info

        exits = CounterMetricFamily("flaskapi_worker_exits", "Worker processes reaped by the master", labels=["cause"])
        for cause, count in sorted(self.exits.items()):
            exits.add_metric([cause], count)
        yield exits
        restarts = sum(count for cause, count in self.exits.items() if cause not in STOPPED)
        yield CounterMetricFamily(
            "flaskapi_worker_restarts", "Workers that died unexpectedly and were replaced", value=restarts
        )

        workers = dict(self.server.WORKERS)
        yield GaugeMetricFamily("flaskapi_workers_alive", "Worker processes running", value=len(workers))
        yield GaugeMetricFamily(
            "flaskapi_workers_alive_lowest",
            f"Fewest worker processes running at any moment of the last {LOWEST_WINDOW_SECONDS:g} s",
            value=self.lowest_alive(len(workers)),
        )
        yield from process_families([(os.getpid(), "master")] + [(pid, "worker") for pid in workers])

        yield GaugeMetricFamily(
            "flaskapi_database_up", "1 when the database answers SELECT 1", value=1 if self.database_probe() else 0
        )


def process_families(processes: list[tuple[int, str]]):
    """prometheus_client's ProcessCollector series (its names, help texts and types) for each
    (pid, role) that still exists, labelled with both: the dashboards and queries written for
    any Python service's `process_*` work here, per process. A process that exits between the
    listing and the reading is left out."""
    labels = ["pid", "role"]
    families = {
        "virtual_memory_bytes": GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", labels=labels
        ),
        "resident_memory_bytes": GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory size in bytes.", labels=labels
        ),
        "start_time_seconds": GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", labels=labels
        ),
        "cpu_seconds": CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", labels=labels
        ),
        "open_fds": GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", labels=labels),
        "max_fds": GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", labels=labels),
    }
    for pid, role in processes:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                memory = process.memory_info()
                times = process.cpu_times()
                values = {
                    "virtual_memory_bytes": memory.vms,
                    "resident_memory_bytes": memory.rss,
                    "start_time_seconds": process.create_time(),
                    "cpu_seconds": times.user + times.system,
                    "open_fds": process.num_fds(),
                    "max_fds": process.rlimit(psutil.RLIMIT_NOFILE)[0],
                }
        except psutil.Error:  # exited (or a zombie not yet reaped) between listing and reading
            continue
        for key, value in values.items():
            families[key].add_metric([str(pid), role], value)
    yield from families.values()


class WorkerSamples(MultiProcessCollector):
    """Every live worker's sample files, the dead workers' totals and the master's own counts,
    merged.

    A file shorter than its 8-byte header is skipped: prometheus_client's MmapedDict creates a
    file empty and only then sizes it, and a scrape in that instant failed whole with
    struct.error, a 500 for every series (seen while a master started its workers); files only
    grow, so the next scrape reads it whole.

    A live worker's file that was listed at the previous scrape and is gone now (an operator
    cleaning the directory) is waited for, up to REWRITE_WAIT: the worker rewrites it within a
    second (sample_files.repair), and a scrape without it would show its counters dropping, a
    reset to Prometheus, and their return as that many new requests."""

    REWRITE_WAIT = 2.5  # seconds: two rounds of the workers' sampler (metrics.SAMPLE_SECONDS)

    def __init__(self, registry, server, dead: DeadWorkers) -> None:
        super().__init__(registry)
        self.server = server
        self.dead = dead
        self._listed: set[tuple[str, str]] = set()  # (prefix, pid) of the live workers' files last read

    def collect(self):
        self._wait_for_rewrites()
        with self.dead.lock:
            self.dead.restore()
            listed = self._list()
            live = self._live()
            self._listed = {name for name in listed if name[1] in live}
            metrics = MultiProcessCollector._read_metrics(list(listed.values()))
        add_held(metrics, sample_files.held())
        merged = MultiProcessCollector._accumulate_metrics(metrics, accumulate=True)
        exemplars.attach(merged, exemplars.read(self._path, live))
        return merged

    def _live(self) -> set[str]:
        return {str(pid) for pid in list(self.server.WORKERS)}  # list(): one step, as the arbiter changes it

    def _list(self) -> dict[tuple[str, str], str]:
        """(prefix, pid) -> path of every sample file that holds at least its header."""
        files = {}
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.stat(path).st_size < sample_files.HEADER_BYTES:
                    continue
            except FileNotFoundError:  # removed since listed
                continue
            prefix, _, pid = os.path.basename(path)[: -len(".db")].rpartition("_")
            files[(prefix, pid)] = path
        return files

    def _wait_for_rewrites(self) -> None:
        deadline = time.monotonic() + self.REWRITE_WAIT
        while True:
            live = self._live()
            missing = {name for name in self._listed if name[1] in live} - self._list().keys()
            if not missing or time.monotonic() > deadline:
                return
            time.sleep(0.05)


def add_held(metrics: dict[str, Metric], held) -> None:
    """The master's own counts (sample_files.held), added as one more process's samples to
    what prometheus_client's _read_metrics made of the files (the step its `merge` takes
    before accumulating), so they are summed with the workers' as if they had a file."""
    for prefix, key, value in held:
        metric_name, name, labels, help_text = json.loads(key)
        metric = metrics.get(metric_name)
        if metric is None:
            metric = metrics[metric_name] = Metric(metric_name, help_text, prefix)
        metric.add_sample(name, tuple(sorted(labels.items())), value)


def start(server, *, bind: str, version: str):
    """Serve the merged metrics on `bind` (host:port) from a thread of the master; returns the
    master's collector (for the exit counts) and the HTTP server (to shut down)."""
    host, _, port = bind.rpartition(":")
    registry = CollectorRegistry()
    WorkerSamples(registry, server, dead_workers())
    collector = MasterMetrics(server, version=version, database_probe=database_probe(server))
    registry.register(collector)
    httpd = serve(SecurityHeaders(make_wsgi_app(registry)), host or "127.0.0.1", int(port))
    log.info("metrics for all workers on http://%s/metrics", bind, extra={"event": "metrics_listening"})
    return collector, httpd


class _Response(ServerHandler):
    server_software = SERVER  # what wsgiref sends as `Server` with every answer of the app


class _Handler(WSGIRequestHandler):
    """wsgiref's request handler without the version in `Server` (the app's answers and the
    handler's own errors: a bad request line, 414) and without a log line per scrape."""

    server_version = SERVER

    def version_string(self) -> str:
        return SERVER

    def log_message(self, format, *args) -> None:
        """No line per scrape (prometheus_client's handler is silent too)."""

    def handle(self) -> None:
        """As WSGIRequestHandler.handle, with _Response in place of wsgiref's ServerHandler."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():  # the error was sent
            return
        handler = _Response(self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self
        handler.run(self.server.get_app())


def serve(app, host: str, port: int):
    """`app` on host:port (IPv4 or IPv6, as the address says) from a daemon thread, one thread
    per request; returns the server (`shutdown()` stops it)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family
        # socketserver listens with a backlog of 5: of 200 scrapes connecting at once, some
        # waited for the kernel's SYN retry (1 s and more).
        request_queue_size = socket.SOMAXCONN

    httpd = make_server(sockaddr[0], port, app, Server, handler_class=_Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


_dead_workers: sample_files.DeadWorkers | None = None


def dead_workers() -> sample_files.DeadWorkers:
    """The master's totals of its dead workers' samples (one per master)."""
    global _dead_workers
    if _dead_workers is None:
        _dead_workers = sample_files.DeadWorkers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    return _dead_workers


def worker_gone(pid: int) -> None:
    """A reaped worker's counters and histograms join the dead workers' totals, its gauges stop
    counting, and its files are deleted (the directory does not grow with crashes). Never
    raises: it runs in the arbiter's loop, which an exception would stop."""
    try:
        exemplars.forget(dead_workers().directory, pid)
        dead_workers().fold(pid)
    except Exception:  # a full disk, an unwritable directory: its files stay, counted as they are
        log.exception(
            "metrics: cannot fold the samples of worker %d; its files stay",
            pid,
            extra={"event": "metrics_files_unwritable", "worker_pid": pid},
        )


def database_probe(server):
    """A check of the app's database with a throwaway connection (never a pooled one: the
    master forks workers, and a pooled connection would be shared with them). Scrapes that
    arrive while a check runs share its answer: a burst of 200 scrapes opens a connection or
    two, not 200 (more than the database's max_connections). A scrape waits for it at most
    DB_PING_TIMEOUT_MS, as /readyz does: a frozen database is "not up", never a hung scrape."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    config = server.app.wsgi().config
    engine = create_engine(config["SQLALCHEMY_DATABASE_URI"], poolclass=NullPool, connect_args={"connect_timeout": 1})

    def check() -> bool:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # any failure means "not up" for the gauge
            return False

    return SharedCheck(check, wait_seconds=config["APP_SETTINGS"].db_ping_timeout_ms / 1000)


class SharedCheck:
    """`check()` run by one thread at a time; a caller that arrives meanwhile takes the answer
    of the check running then (one that began before it arrived, so never older than one check).
    Each caller waits at most `wait_seconds` and then answers False: a check the database never
    answers (frozen server, a connection black-holed after connect) stays one stuck thread, and
    every scrape still answers on time; the next check starts once that one returns."""

    def __init__(self, check, *, wait_seconds: float) -> None:
        self.check = check
        self.wait_seconds = wait_seconds
        self._done = threading.Condition()
        self._running = False
        self._round = 0
        self._answer = False

    def __call__(self) -> bool:
        with self._done:
            round_ = self._round
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="database-probe", daemon=True).start()
            finished = self._done.wait_for(lambda: self._round != round_, timeout=self.wait_seconds)
            return self._answer if finished else False

    def _run(self) -> None:
        answer = False
        try:
            answer = self.check()
        finally:
            with self._done:
                self._running, self._answer, self._round = False, answer, self._round + 1
                self._done.notify_all()
