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
