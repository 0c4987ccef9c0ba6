"""Prometheus metrics recorded by each worker: HTTP (prometheus-flask-exporter), requests in
flight and, through pool_metrics.py, the DB pool.

prometheus_client runs in multiprocess mode: every worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR and the gunicorn master serves them merged on METRICS_BIND
(master_metrics.py), so values are summed across workers and the public port never exposes
them. PROMETHEUS_MULTIPROC_DIR must be set before Python starts (the launcher wipes it);
without it, as under `flask run` or in-process tests, recording is off. Only workers write
files, and they rewrite them if removed; the master folds a dead worker's into totals
(sample_files.py, docs/metrics.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from flask import Flask
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

# 5 ms .. 30 s: fast reads, argon2 logins (~50-100 ms) and the lesson's 30 s stalls all resolve.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
)

# registry=None: in multiprocess mode samples go to files whatever the registry, and module-level
# metrics must not be registered twice when tests build several apps in one process.
IN_PROGRESS = Gauge(
    "flask_http_requests_in_progress",
    "Requests being served (sampled every second)",
    registry=None,
    multiprocess_mode="livesum",
)
# The exporter counts exceptions that escape Flask; ours are all answered by the 500 handler,
# which counts them here. No labels, so the series exists (at 0) before the first one; the
# route, type and stack are in the error log line and the Sentry event.
UNHANDLED = Counter(
    "flaskapi_http_unhandled_exceptions_total",
    "Requests answered 500 because of an unexpected exception",
    registry=None,
)
# A worker whose sample files were removed (an operator cleaning /run) rewrites them within a
# second (sample_files.repair) and counts them here, in the files it just rewrote.
FILES_REWRITTEN = Counter(
    "flaskapi_metrics_files_rewritten_total",
    "Sample files a worker found removed and rewrote with its current values",
    registry=None,
)


SAMPLE_SECONDS = 1.0


class ChildCachingRegistry(CollectorRegistry):
    """The exporter's registry: each labelled metric registered on it answers `labels(...)` from
    a dict of the children it already made, by the label values as given. prometheus_client's own
    `labels` sorts the names, turns every value into text and takes the metric's lock on every
    call, twice a request for the exporter's histogram and counter: 16k -> 6k instructions a
    call (callgrind). The children are the metric's own, made once by its `labels`; the exporter
    never removes one, so the dict holds exactly the series the metric has."""

    def register(self, collector) -> None:
        super().register(collector)
        if getattr(collector, "_labelnames", None) and not getattr(collector, "_labelvalues", None):
            collector.labels = _cached_labels(collector.labels)


def _cached_labels(labels):
    children: dict = {}

    def cached(*values, **named):
        key = (values, tuple(named.items()))
        child = children.get(key)
        if child is None:
            child = children[key] = labels(*values, **named)
        return child

    return cached


def enabled(settings) -> bool:
    """The one switch: METRICS_ENABLED and a multiprocess directory, which the launcher sets
    before Python starts (absent under `flask run`, the CLI and in-process tests)."""
    return settings.metrics_enabled and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def route(req) -> str:
    """The `route` label: the route template, never the raw path (ids would explode the label set)."""
    return req.url_rule.rule if req.url_rule is not None else "<unmatched>"


def init_app(app: Flask, settings) -> None:
    """HTTP metrics, requests in flight and the pool's gauges and counters, when `enabled`."""
    if not enabled(settings):
        if settings.metrics_enabled:  # asked for, but this process has nowhere to write samples
            log.info("this process records no metrics: PROMETHEUS_MULTIPROC_DIR is unset (docs/metrics.md)")
        return
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

    # A registry per app: the exporter registers its metrics on it, and a second app in one
    # process (tests) would otherwise find them taken and silently skip its hooks.
    GunicornPrometheusMetrics(
        app, path=None, registry=ChildCachingRegistry(auto_describe=True), group_by=route, buckets=LATENCY_BUCKETS
    )

    from service.extensions import db
    from service.observability import pool_metrics

    with app.app_context():
        pool_metrics.instrument(db.engine, settings)


def worker_started() -> None:
    """In each worker right after the fork (gunicorn's post_fork): it starts writing its sample
    files, its pool's capacity counts from the start, and the sampler starts. Never in the
    master, whose files would count as one more live process. Called only when the master
    serves metrics (gunicorn_hooks.py)."""
    from service.observability import exemplars, pool_metrics, sample_files

    sample_files.start()
    exemplars.start(LATENCY_BUCKETS)
    pool_metrics.worker_started()
    threading.Thread(target=_sample_forever, name="metrics-sampler", daemon=True).start()


def _sample_forever() -> None:
    """The gauges that change on every request (requests in flight, connections checked out)
    are read here once every SAMPLE_SECONDS instead of written on every change: a gauge is only
    ever seen at scrape time anyway, and writing each change to the multiprocess files costs
    four writes under one process-wide lock per request (~15 us, measured). Each round also
    rewrites this worker's sample files if they were removed (sample_files.repair) and writes
    the exemplars kept since the last round (exemplars.dump)."""
    from service.observability import exemplars, pool_metrics, request_log, sample_files

    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    failing = False
    while True:
        IN_PROGRESS.set(len(request_log.serving))  # the threads serving a request now
        pool_metrics.sample()
        try:
            rewritten = sample_files.repair()
            exemplars.dump(directory)
        except OSError as exc:  # the directory unwritable, the disk full: tried again each round
            if not failing:
                log.error(
                    "metrics sample files of worker %d are gone and cannot be rewritten: %s",
                    os.getpid(),
                    exc,
                    extra={"event": "metrics_files_unwritable"},
                )
            failing = True
        else:
            failing = False
            if rewritten:
                FILES_REWRITTEN.inc(len(rewritten))
        time.sleep(SAMPLE_SECONDS)
