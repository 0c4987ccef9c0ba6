"""The gunicorn master SIGKILLed (the OOM killer's way) with a request in flight, on a real
gunicorn, then restarted on the same ports as systemd would restart the unit.

What must hold, for gthread and for sync workers (service/observability/master_watch.py):
- new connections to the API port and to the metrics port are refused at once, not accepted by
  the kernel and left unanswered;
- the request in flight is still answered (200), and the orphaned workers exit within
  master_watch.GRACE_SECONDS of the end of that request;
- each worker writes an ERROR line with the dead master's pid, and each is a Sentry event;
- a new master binds the same ports and serves; a graceful stop of it reports no master death.

Every process is started here and the process group is killed in a `finally`; every wait is
bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.harness.environment import stack_env
from bench.harness.gunicorn import CONFIG, GUNICORN, Gunicorn
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from bench.harness.scrape import metric, scrape
from bench.harness.sentry_receiver import SentryReceiver
from service.observability.master_watch import GRACE_SECONDS

pytestmark = pytest.mark.stack

WORKERS = 2
APP_NAME = "flaskapi-observability"  # application_name of the service's connections


def connect(port: int) -> str:
    """What a new client of 127.0.0.1:port gets: "refused", "reset" (accepted, then dropped),
    "hung" (accepted, no answer to a request within 2 s) or "answered"."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return "answered" if sock.recv(1) else "reset"
        except TimeoutError:
            return "hung"
        except OSError:
            return "reset"


def booted(pid: int) -> bool:
    """Whether a worker runs with its own signal handlers (gunicorn's init_signals, after the
    post_fork hook): until then it has the master's, and a SIGTERM to it would be taken for the
    master's queue and lost. The master catches SIGHUP, a worker does not."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE).group(1), 16)
    return not caught & (1 << (signal.SIGHUP - 1))


def workers_booted(master: int, count: int = WORKERS) -> set[int]:
    """The master's `count` workers, once each has booted."""

    def ready():
        pids = {child.pid for child in psutil.Process(master).children()}
        return pids if len(pids) == count and all(map(booted, pids)) else None

    return wait_for(ready, f"{count} booted workers under {master}")


def exited(pid: int) -> bool:
    """Gone, or a zombie its new parent has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def lock_waiters(engine) -> int:
    """The service's statements waiting on a lock, read in a transaction of its own (within one,
    pg_stat_activity is a snapshot taken at its first read)."""
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND wait_event_type = 'Lock'"),
            {"app": APP_NAME},
        ).scalar()


def records(log_dir: Path, event: str) -> list[dict]:
    return [
        record
        for path in sorted(log_dir.glob("app.log*"))
        for record in map(json.loads, path.read_text(encoding="utf-8").splitlines())
        if record.get("event") == event
    ]


@pytest.mark.parametrize("threads", ["4", "1"], ids=["gthread", "sync"])
def test_a_killed_master_leaves_no_listening_orphans_and_a_new_one_takes_the_ports(
    migrated_database, tmp_path, threads
):
    uri = migrated_database(f"test_master_death_{threads}")
    log_dir = tmp_path / "logs"
    locker_engine = create_engine(uri, poolclass=NullPool)
    with SentryReceiver() as receiver:
        env = stack_env(uri, tmp_path, GUNICORN_THREADS=threads, SENTRY_DSN=receiver.dsn, SENTRY_TRACES_SAMPLE_RATE="0")
        stack = Gunicorn(env, workers=WORKERS, log_path=tmp_path / "gunicorn.out")
        restarted = None
        locker = locker_engine.connect()
        try:
            stack.start()
            master = stack.pid
            orphans = workers_booted(master)

            # A request in flight: it waits on our lock on the books table.
            locker.execute(text("LOCK TABLE books IN ACCESS EXCLUSIVE MODE"))
            in_flight: dict = {}

            def request() -> None:
                try:
                    in_flight["response"] = requests.get(stack.url + "/books/", timeout=60)
                except requests.RequestException as exc:
                    in_flight["error"] = exc

            client = threading.Thread(target=request, daemon=True)
            client.start()
            wait_for(lambda: lock_waiters(locker_engine) == 1, "the request to wait on the lock")

            os.kill(master, signal.SIGKILL)
            killed_at = time.monotonic()
            stack.process.wait(10)

            # New clients are refused on both ports while the request is still in flight (its
            # worker is still there), then it is answered once the lock goes.
            wait_for(lambda: connect(stack.port) == "refused", "the API port to refuse connections", GRACE_SECONDS)
            refused_after = time.monotonic() - killed_at
            wait_for(lambda: connect(stack.metrics_port) == "refused", "the metrics port to refuse connections", 3)
            assert not in_flight, in_flight
            locker.rollback()
            client.join(30)
            assert "response" in in_flight, in_flight
            assert in_flight["response"].status_code == 200, in_flight["response"].text[:300]
            answered_at = time.monotonic()

            # Then the orphans leave.
            wait_for(lambda: all(map(exited, orphans)), "the orphaned workers to exit", timeout=GRACE_SECONDS + 30)
            exited_after = time.monotonic() - answered_at
            print(f"master killed: refused after {refused_after:.2f} s, orphans gone {exited_after:.2f} s after")

            # One ERROR line per worker with the dead master's pid, and one Sentry event each.
            deaths = records(log_dir, "master_died")
            assert {d["worker_pid"] for d in deaths} == orphans, deaths
            assert {(d["level"], d["master_pid"]) for d in deaths} == {("ERROR", master)}, deaths
            events = receiver.wait_for(lambda e: str(e.get("tags", {}).get("master_pid")) == str(master), count=WORKERS)
            assert {str(e["tags"]["worker_pid"]) for e in events} == {str(pid) for pid in orphans}
            assert not records(log_dir, "orphan_cut"), "the request in flight was cut"

            # What systemd does next: start the unit again (an empty metrics directory, the same
            # ports). It binds at once and serves.
            metrics_dir = tempfile.mkdtemp(prefix="metrics-", dir=tmp_path)
            restarted = ManagedProcess(
                [GUNICORN, "-c", CONFIG],
                env={**_restart_env(stack, env), "PROMETHEUS_MULTIPROC_DIR": metrics_dir},
                log_path=tmp_path / "gunicorn-restarted.out",
                ready_url=stack.url + "/healthz",
                name="restarted gunicorn",
            )
            restarted.start()
            assert requests.get(stack.url + "/books/", timeout=10).status_code == 200
            wait_for(
                lambda: metric(scrape(stack.metrics_url), "flaskapi_workers_alive") == WORKERS,
                "the new master's workers",
            )
            assert "Connection in use" not in restarted.output()
            workers_booted(restarted.pid)  # a stop sent earlier could be lost (see booted)
            assert restarted.stop() == 0
            shutil.rmtree(metrics_dir, ignore_errors=True)
            # A graceful stop is not a master death.
            assert len(records(log_dir, "master_died")) == WORKERS
        finally:
            with contextlib.suppress(Exception):
                locker.rollback()
            locker.close()
            locker_engine.dispose()
            if restarted is not None:
                restarted.stop()
            stack.stop()
            # The orphans, if any are left, are still in the dead master's process group.
            if stack.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(stack.pid, signal.SIGKILL)


def _restart_env(stack: Gunicorn, env: dict[str, str]) -> dict[str, str]:
    """The first master's environment: the same settings, the same BIND and METRICS_BIND."""
    return {
        **os.environ,
        **env,
        "BIND": f"127.0.0.1:{stack.port}",
        "METRICS_BIND": f"127.0.0.1:{stack.metrics_port}",
        "WEB_CONCURRENCY": str(WORKERS),
    }
