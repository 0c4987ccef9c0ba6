"""What the gunicorn master adds: the merged metrics endpoint and the report of worker deaths.

A worker killed by `os._exit`, SIGKILL (the OOM killer) or a timeout abort cannot report itself,
so the master does: gunicorn logs each exit status just before calling `child_exit`; we keep
that status from its log record, then write one JSON line with pid and cause, count the exit
(and, if it was not a clean exit, a restart), and send a Sentry event.

The metrics endpoint serves every worker's multiprocess samples merged, plus what only the
master knows: worker exits and restarts, each live worker's memory and CPU (multiprocess mode
has no process collector), build info, and whether the database answers.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter as Tally

import psutil
from gunicorn.glogging import Logger as GunicornLogger
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

log = logging.getLogger("service.workers")

CLEAN_EXIT = "clean exit"
# What the master itself sends to stop workers (shutdown, reload, scale down): not a crash.
STOPPED = frozenset({CLEAN_EXIT, "SIGTERM", "SIGINT", "SIGQUIT"})


class AppWritesAccessLog(GunicornLogger):
    """gunicorn's logger without its access line: the app writes one, with the route, the user
    and the request id (request_log.py). Stock gunicorn, whenever a logconfig_dict is set, still
    builds its access line's atoms on every request only for the disabled logger to drop them
    (~25 us a request, measured)."""

    def access(self, resp, req, environ, request_time) -> None:
        return None


class ExitStatusRecorder(logging.Filter):
    """Keeps the exit status gunicorn's arbiter logs for each reaped worker (it does not pass
    the status to `child_exit`). Reads the record's arguments, not its text."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[int, str] = {}
        self.timed_out: set[int] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        template, args = record.msg, record.args
        if isinstance(template, str) and isinstance(args, tuple) and args:
            with self._lock:
                if template.startswith("Worker (pid:%s) was sent"):
                    self.status[int(args[0])] = str(args[1])
                elif template.startswith("Worker (pid:%s) exited with code"):
                    self.status[int(args[0])] = f"exit code {args[1]}"
                elif template.startswith("WORKER TIMEOUT (pid:%s)"):
                    self.timed_out.add(int(args[0]))
        return True

    def cause_of(self, pid: int) -> str:
        with self._lock:
            status = self.status.pop(pid, CLEAN_EXIT)
            if pid in self.timed_out:
                self.timed_out.discard(pid)
                return "timeout"
        return status


class MasterMetrics(Collector):
    """Series only the master can produce, computed at scrape time."""

    def __init__(self, server, *, version: str, database_probe) -> None:
        self.server = server
        self.version = version
        self.database_probe = database_probe
        self.exits: Tally[str] = Tally()

    def collect(self):
        info = GaugeMetricFamily("flaskapi_build_info", "Version and configured worker count",
                                 labels=["version", "workers"])
        info.add_metric([self.version, str(self.server.num_workers)], 1)
        yield info

        exits = CounterMetricFamily("flaskapi_worker_exits", "Worker processes reaped by the master",
                                    labels=["cause"])
        for cause, count in sorted(self.exits.items()):
            exits.add_metric([cause], count)
        yield exits
        restarts = sum(count for cause, count in self.exits.items() if cause not in STOPPED)
        yield CounterMetricFamily("flaskapi_worker_restarts",
                                  "Workers that died unexpectedly and were replaced", value=restarts)

        workers = dict(self.server.WORKERS)
        yield GaugeMetricFamily("flaskapi_workers_alive", "Worker processes running", value=len(workers))
        memory = GaugeMetricFamily("flaskapi_process_resident_memory_bytes",
                                   "Resident memory per gunicorn process", labels=["pid", "role"])
        cpu = CounterMetricFamily("flaskapi_process_cpu_seconds",
                                  "CPU time (user + system) per gunicorn process", labels=["pid", "role"])
        for pid, role in [(os.getpid(), "master")] + [(pid, "worker") for pid in workers]:
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    rss = process.memory_info().rss
                    times = process.cpu_times()
            except psutil.Error:  # exited between listing and reading
                continue
            memory.add_metric([str(pid), role], rss)
            cpu.add_metric([str(pid), role], times.user + times.system)
        yield memory
        yield cpu

        yield GaugeMetricFamily("flaskapi_database_up", "1 when the database answers SELECT 1",
                                value=1 if self.database_probe() else 0)


class MasterHooks:
    """The gunicorn server hooks, bound to one master process (see deploy/gunicorn.conf.py)."""

    def __init__(self, *, metrics_bind: str | None, version: str) -> None:
        self.metrics_bind = metrics_bind
        self.version = version
        self.exit_status = ExitStatusRecorder()
        self.master_metrics: MasterMetrics | None = None
        self._httpd = None

    def on_starting(self, server) -> None:
        logging.getLogger("gunicorn.error").addFilter(self.exit_status)

    def when_ready(self, server) -> None:
        if not self.metrics_bind:
            return
        host, _, port = self.metrics_bind.rpartition(":")
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        self.master_metrics = MasterMetrics(server, version=self.version,
                                            database_probe=_database_probe(server))
        registry.register(self.master_metrics)
        self._httpd, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
        log.info("metrics for all workers on http://%s/metrics", self.metrics_bind,
                 extra={"event": "metrics_listening"})

    def post_fork(self, server, worker) -> None:
        """Runs in the new worker."""
        if self.metrics_bind:
            from service.observability.metrics import worker_started

            worker_started()

    def child_exit(self, server, worker) -> None:
        if self.metrics_bind:
            mark_process_dead(worker.pid)
        cause = self.exit_status.cause_of(worker.pid)
        if self.master_metrics is not None:
            self.master_metrics.exits[cause] += 1
        if cause in STOPPED:
            log.info("worker %d stopped (%s)", worker.pid, cause,
                     extra={"event": "worker_exit", "worker_pid": worker.pid, "cause": cause})
            return
        import sentry_sdk

        with sentry_sdk.new_scope() as scope:
            scope.set_tag("worker_pid", worker.pid)
            scope.set_tag("cause", cause)
            scope.fingerprint = ["gunicorn-worker-died", cause]
            log.error("worker %d died (%s); the master starts a replacement", worker.pid, cause,
                      extra={"event": "worker_died", "worker_pid": worker.pid, "cause": cause})
        # Send it now: the replacement is forked next, and an event still queued in the master
        # would be copied into the child and sent a second time from there.
        from service.observability.sentry import flush

        flush()

    def on_exit(self, server) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
        from service.observability.sentry import flush

        flush()


def _database_probe(server):
    """A check of the app's database with a throwaway connection (never a pooled one: the
    master forks workers, and a pooled connection would be shared with them)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    uri = server.app.wsgi().config["SQLALCHEMY_DATABASE_URI"]
    engine = create_engine(uri, poolclass=NullPool, connect_args={"connect_timeout": 1})

    def probe() -> bool:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # any failure means "not up" for the gauge
            return False

    return probe
