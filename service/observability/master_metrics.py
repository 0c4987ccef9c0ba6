"""The gunicorn master's metrics endpoint (METRICS_BIND).

It serves every worker's multiprocess samples merged, plus what only the master knows: worker
exits and restarts, each live worker's memory and CPU (multiprocess mode has no process
collector), build info, and whether the database answers.
"""

from __future__ import annotations

import logging
import os
from collections import Counter as Tally

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from service.observability.worker_exits import STOPPED

log = logging.getLogger("service.workers")


class MasterMetrics(Collector):
    """Series only the master can produce, computed at scrape time."""

    def __init__(self, server, *, version: str, database_probe) -> None:
        self.server = server
        self.version = version
        self.database_probe = database_probe
        self.exits: Tally[str] = Tally()

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
        memory = GaugeMetricFamily(
            "flaskapi_process_resident_memory_bytes", "Resident memory per gunicorn process", labels=["pid", "role"]
        )
        cpu = CounterMetricFamily(
            "flaskapi_process_cpu_seconds", "CPU time (user + system) per gunicorn process", labels=["pid", "role"]
        )
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

        yield GaugeMetricFamily(
            "flaskapi_database_up", "1 when the database answers SELECT 1", value=1 if self.database_probe() else 0
        )


def start(server, *, bind: str, version: str):
    """Serve the merged metrics on `bind` (host:port) from a thread of the master; returns the
    master's collector (for the exit counts) and the HTTP server (to shut down)."""
    host, _, port = bind.rpartition(":")
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    collector = MasterMetrics(server, version=version, database_probe=database_probe(server))
    registry.register(collector)
    httpd, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    log.info("metrics for all workers on http://%s/metrics", bind, extra={"event": "metrics_listening"})
    return collector, httpd


def worker_gone(pid: int) -> None:
    """A reaped worker's live gauges stop counting in the merged samples."""
    mark_process_dead(pid)


def database_probe(server):
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
