"""The embedded development Postgres: a real PostgreSQL 16 from the `pgserver` wheel.

Used only when `DB_URI` is unset outside production, so `make run`, the `flask` CLI and the
tests need no system install yet never fall back to SQLite. The server listens on a Unix socket
inside the data dir (no TCP port to collide with) and keeps running between commands, so the
CLI, gunicorn and its workers all reach the same database; `make db-stop` stops it (`stop`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from service.settings import normalise_database_uri

DEFAULT_DATABASE = "flaskapi"


def server(pgdata: Path, cleanup_mode: str | None = None):
    """A handle on the server in `pgdata`, started if it is not running."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        import pgserver

        pgdata.mkdir(parents=True, exist_ok=True)
        return pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)


_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def ensure_database(pgdata: Path, database: str = DEFAULT_DATABASE) -> str:
    """Start (or reuse) the server in `pgdata`, create `database` if missing, return its URI."""
    return create_database(server(pgdata), database)


def create_database(handle, database: str) -> str:
    """Create `database` on a running server unless it exists; return its SQLAlchemy URI."""
    if not _DATABASE_NAME.fullmatch(database):  # it is spliced into SQL below (psql takes no parameters)
        raise ValueError(f"database name {database!r}: use lower-case letters, digits and _")
    exists = handle.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608 (checked)
    if "(1 row)" not in exists:
        handle.psql(f'CREATE DATABASE "{database}";')
    return normalise_database_uri(handle.get_uri(database))


HANDLES = ".handle_pids.json"  # pgserver's list of the processes that hold a handle on the server
# A process started this long after the list was last written cannot have written itself into
# it: its pid is a reused one (psutil's start times are exact to about a second).
_PID_REUSE_SLACK_SECONDS = 2.0


def stop(pgdata: Path) -> tuple[bool, str]:
    """Stop the server in `pgdata` unless a live process still holds a handle on it; prune the
    holders that are gone (SIGKILLed, so never removed themselves). Returns (whether nothing is
    left in the way, one line saying what was done).

    pgserver stops the server only when its last holder exits cleanly, and a stale pid in its
    list kept it running for ever; its own `cleanup()` returned silently whenever the list
    held another pid. Taken under pgserver's lock, so nobody registers meanwhile."""
    import psutil

    pgdata = pgdata.expanduser().resolve()
    if not (pgdata / "PG_VERSION").exists():
        return True, f"db-stop: no embedded Postgres in {pgdata}: nothing to stop"
    pgserver = _pgserver()
    with pgserver.PostgresServer._lock:
        handles = pgserver.utils.DiskList(pgdata / HANDLES)
        listed = handles.get()
        written = (pgdata / HANDLES).stat().st_mtime if listed else 0.0
        holders = {pid: command for pid in listed if (command := _holder(psutil, pid, written)) is not None}
        pruned = [pid for pid in listed if pid not in holders]
        if pruned:
            handles.put([pid for pid in listed if pid in holders])
        note = f"; pruned dead pid{'s' if len(pruned) > 1 else ''} {', '.join(map(str, pruned))}" if pruned else ""
        if holders:
            users = "; ".join(f"pid {pid} ({command})" for pid, command in holders.items())
            return False, f"db-stop: the embedded Postgres in {pgdata} is still used by {users}: not stopped{note}"
        try:
            info = pgserver.utils.PostmasterInfo.read_from_pgdata(pgdata)
        except (AssertionError, ValueError):  # a postmaster.pid being written or left half-written
            info = None
        if info is None or not info.is_running():
            return True, f"db-stop: the embedded Postgres in {pgdata} is not running{note}"
        # As pgserver runs it: as its own system user when we are root.
        user = "pgserver" if os.geteuid() == 0 else None
        try:
            pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            return False, f"db-stop: pg_ctl stop failed for {pgdata} ({exc}): see {pgdata / 'log'}{note}"
        return True, f"db-stop: stopped the embedded Postgres (pid {info.pid}) in {pgdata}{note}"


def _holder(psutil, pid: int, written: float) -> str | None:
    """The command line of `pid` if it may hold a handle: alive, not a zombie, not a pid reused
    by a process started after the list was last written; None otherwise. Control characters
    are escaped: the report is one line."""
    from logging_conf.formatter import escape_controls

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if process.create_time() > written + _PID_REUSE_SLACK_SECONDS:
            return None
        try:
            return escape_controls(" ".join(process.cmdline()) or process.name())
        except psutil.AccessDenied:
            return escape_controls(process.name())
    except psutil.NoSuchProcess:
        return None


def _pgserver():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in `server`
        import pgserver
        import pgserver.utils

        return pgserver


def pgdata_for(data_dir: Path) -> Path:
    return data_dir / "postgres"


def main() -> None:
    from service.settings import Settings

    parser = argparse.ArgumentParser(description="Embedded development Postgres")
    parser.add_argument("action", choices=["uri", "stop"])
    args = parser.parse_args()
    pgdata = pgdata_for(Settings.from_env({"FLASK_ENV": "development"}).data_dir)
    if args.action == "uri":
        print(ensure_database(pgdata))
    else:
        stopped, line = stop(pgdata)
        print(line)
        sys.exit(0 if stopped else 1)


if __name__ == "__main__":
    main()
