"""How the service talks to Postgres: engine options and the stale-connection check.

Autocommit: each statement of a request is its own transaction (every write here is a single
statement), so a request costs one round trip per statement instead of three (psycopg2's
BEGIN, the statement, and the COMMIT or the pool's ROLLBACK on return). Work that needs a
multi-statement transaction asks for one (migrations, the seed command).

SQLAlchemy's `pool_pre_ping` costs a round trip on every checkout (~90 us, 15 % of a list page,
measured). A connection used a moment ago is known to be alive, so the check here (SQLAlchemy's
documented pessimistic-disconnect recipe, made conditional) pings only connections that sat in
the pool longer than DB_PING_IDLE_SECONDS: after a database restart those fail the ping and
are replaced before a request sees them, and connections that were in use during an outage
were already invalidated by SQLAlchemy's disconnect handling. The service recovers by itself.
"""

from __future__ import annotations

import time

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

from service.settings import Settings


def engine_options(settings: Settings) -> dict:
    from service.observability import pool_metrics

    return {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        "pool_pre_ping": False,  # see ping_idle_connections
        "isolation_level": "AUTOCOMMIT",
        # A failed statement's error (its log line, its Sentry event) shows the SQL but never the
        # values bound to it: those are what clients sent (emails, titles) or secrets.
        "hide_parameters": True,
        "poolclass": pool_metrics.pool_class(settings),
        "connect_args": {
            "connect_timeout": settings.db_connect_timeout,
            "application_name": "flaskapi-observability",
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
        },
    }


def ping_idle_connections(engine: Engine, *, idle_seconds: float) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection, record) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checking_out(dbapi_connection, record, proxy) -> None:
        returned = record.info.get("checked_in_at")
        if returned is None or time.monotonic() - returned <= idle_seconds:
            return  # new, or used a moment ago
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out another (up to three tries).
            raise DisconnectionError(f"stale connection: {exc}") from exc
