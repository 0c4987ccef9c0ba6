"""The embedded development Postgres: a real PostgreSQL 16 from the `pgserver` wheel.

Used only when `DB_URI` is unset outside production, so `make run`, the `flask` CLI and the
tests need no system install yet never fall back to SQLite. The server listens on a Unix socket
inside the data dir (no TCP port to collide with) and keeps running between commands, so the
CLI, gunicorn and its workers all reach the same database; `make db-stop` stops it.
"""

from __future__ import annotations

import argparse
import re
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


def stop(pgdata: Path) -> None:
    if (pgdata / "postmaster.pid").exists():
        server(pgdata, cleanup_mode="stop").cleanup()


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
        stop(pgdata)


if __name__ == "__main__":
    main()
