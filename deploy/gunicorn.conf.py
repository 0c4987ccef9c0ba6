"""gunicorn settings for every way the service runs: `make run`, systemd, compose and the tests.

Everything is read from the environment so one file serves them all:
    BIND             127.0.0.1:5000 (put nginx in front, or set 0.0.0.0:5000 deliberately)
    WEB_CONCURRENCY  worker processes; default cores + 1 (the lesson's rule; on 2 cores three
                     sync workers measured faster than five)
    GUNICORN_TIMEOUT seconds a worker may stay silent before the master kills it
"""
import multiprocessing
import os

wsgi_app = "service:create_app()"
bind = os.environ.get("BIND", "127.0.0.1:5000")
workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count() + 1)
# Sync workers: one request at a time per process, so a worker needs one database connection
# and a crash takes down exactly one in-flight request.
worker_class = "sync"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
keepalive = 5
# Load the app once in the master and fork: a worker that dies is replaced in milliseconds
# instead of re-importing everything. (HUP then reloads settings and workers, not code.)
preload_app = True
proc_name = "flaskapi"
# No gunicornc control socket: one fixed path per user would collide between instances, and
# systemd (HUP, TERM) and the metrics port already cover operating the service.
control_socket_disable = True

# --- settings and logging: validated once in the master, before any worker starts -----------
import sys  # noqa: E402

import logging_conf  # noqa: E402
from service.settings import Settings, SettingsError  # noqa: E402

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"flaskapi-observability: configuration error: {exc}")

# Same JSON handlers for the master, gunicorn's error log and every worker's app loggers.
logconfig_dict = logging_conf.for_gunicorn(_settings.logging_config())
accesslog = None  # the app writes one access line per request (with route, user, request id)
