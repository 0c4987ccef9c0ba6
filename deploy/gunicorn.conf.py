"""gunicorn settings for every way the service runs: `make run`, systemd, compose and the tests.

Everything is read from the environment so one file serves them all:
    BIND              127.0.0.1:5000: loopback, or a private address only nginx reaches; never one
                      clients reach (nginx buffers requests; a slow client holds a gunicorn thread)
    WEB_CONCURRENCY   worker processes; default cores + 1 (the lesson's rule; more processes than
                      that measured slower on 2 cores)
    GUNICORN_THREADS  threads per worker: 4 (gthread, the default, chosen by `make bench`, with the
                      hashing bulkhead: HASH_THREADS more per worker); 1 = sync
    GUNICORN_TIMEOUT  seconds a worker may stay silent before the master kills it
    METRICS_BIND      127.0.0.1:9200: merged Prometheus metrics of all workers, served by the master
    PROMETHEUS_MULTIPROC_DIR  where workers write samples; the launcher (make run, systemd, the
                      tests) sets it to an empty directory. Unset: a private temporary one.
"""

import os
import sys
import tempfile
import types

# First, before anything can create a metric (logging_conf's, the app's when it is preloaded):
# values are written to files only by workers, from their start; the master writes none
# (service/observability/sample_files.py).
from service.observability import sample_files

sample_files.install()

import logging_conf  # noqa: E402
from service.settings import Settings, SettingsError  # noqa: E402

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"flaskapi-observability: configuration error: {exc}")

# HUP (`systemctl reload flaskapi`) runs this file again inside the running master. What belongs
# to the master's lifetime (the empty-directory check, the hooks with the metrics server and the
# worker-exit bookkeeping, a private metrics dir) is set up once and kept in this holder. (USR2,
# gunicorn's binary upgrade, starts a second master on the same directory: restart instead.)
_master = sys.modules.setdefault("_flaskapi_gunicorn_master", types.ModuleType("_flaskapi_gunicorn_master"))
_reloading = getattr(_master, "pid", None) == os.getpid()

# Before a worker starts (sample_files.start reads it), and before anything else reads it.
if not _reloading:
    _master.private_metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _master.private_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
            prefix="flaskapi-metrics-"
        )
    _metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if not os.path.isdir(_metrics_dir) or os.listdir(_metrics_dir):
        sys.exit(
            f"flaskapi-observability: PROMETHEUS_MULTIPROC_DIR={_metrics_dir} must be an existing, empty "
            "directory: wipe it before starting (stale files from an earlier run would be merged in)"
        )

from logging_conf.gunicorn_logger import AppWritesAccessLog  # noqa: E402
from service import parse_errors  # noqa: E402
from service.observability.gunicorn_hooks import MasterHooks  # noqa: E402

wsgi_app = "service:create_app()"
bind = os.environ.get("BIND", "127.0.0.1:5000")
workers = int(os.environ.get("WEB_CONCURRENCY") or (os.cpu_count() or 1) + 1)
threads = _settings.gunicorn_threads
# gthread by default, chosen by measurement (docs/performance.md): argon2 releases the GIL, so a
# worker hashing a password still serves other requests from its other threads (books p95 in
# the 1,000-user ramp: 59-104 ms, against 130-137 ms with 3 or 5 sync workers). The price:
# more CPU per request (thread hops and GIL contention: 745 against 480 us of worker CPU per
# list request; in one saturation run list 2,033 against 2,336 req/s sync, create 1,530 against
# 1,264), and a worker that dies takes its in-flight requests (up to `threads`) with it, where
# a sync worker loses one.
# gthread's worker with the hashing bulkhead (service/hashing_bulkhead.py): registrations and
# logins wait for HASH_THREADS low-priority threads per worker without holding a request thread,
# so the hashes of a login burst cannot starve the book requests of threads or CPU.
# GUNICORN_THREADS=1 gives sync workers (no bulkhead: each request hashes on its process).
worker_class = "service.hashing_worker.HashingBulkheadWorker" if threads > 1 else "sync"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
# Longer than any client's pause between requests (the lesson's users wait up to 4 s): a
# connection the server closes just as the client reuses it fails that request (measured: 2 of
# 42,560 with 5 s). nginx in front keeps its own idle timeout below this (deploy/nginx/).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "20"))
# Load the app once in the master and fork: a worker that dies is replaced in milliseconds
# instead of re-importing everything. (HUP then reloads settings and workers, not code.)
preload_app = True
proc_name = "flaskapi"
# No gunicornc control socket: one fixed path per user would collide between instances, and
# systemd (HUP, TERM) and the metrics port already cover operating the service.
control_socket_disable = True

# Same JSON handlers for the master, gunicorn's error log and every worker's app loggers.
logconfig_dict = logging_conf.for_gunicorn(_settings.logging_config())
accesslog = None  # the app writes one access line per request (with route, user, request id)
logger_class = AppWritesAccessLog

# A request gunicorn itself cannot parse is answered in the one JSON error shape, not HTML, on
# the direct port and through nginx alike (service/parse_errors.py).
parse_errors.install()

# Merged metrics, worker deaths reported (log line, counter, Sentry event), and a worker
# aborted for timeout leaves its threads' stacks.
if not _reloading:
    _master.hooks = MasterHooks(
        metrics_bind=_settings.metrics_bind if _settings.metrics_enabled else None, version=_settings.version
    )
    _master.pid = os.getpid()
_hooks = _master.hooks
on_starting = _hooks.on_starting
when_ready = _hooks.when_ready
post_fork = _hooks.post_fork
child_exit = _hooks.child_exit
worker_abort = _hooks.worker_abort  # in a worker aborted for timeout: the stacks of its threads


def on_exit(server):
    _hooks.on_exit(server)
    if _master.private_metrics_dir:
        import shutil

        shutil.rmtree(_master.private_metrics_dir, ignore_errors=True)
