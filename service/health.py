"""Liveness and readiness: `/healthz` never touches the database, `/readyz` only does.

`/readyz` checks with `SELECT 1` under DB_PING_TIMEOUT_MS for the whole check (the pool's idle
ping, the query, and a new connection if one is needed, which libpq bounds in whole seconds), so
a database that does not answer is a 503 within that, never a hung probe. It is sent even while the database is
known not to answer (service/database.py refuses other statements then): a load balancer that
took the instance out of rotation sends nothing else, so the probe is what sees it come back.
"""

from __future__ import annotations

from apiflask import APIBlueprint
from flask import current_app
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.database import DatabaseTimeout, deadline
from service.errors import error_response
from service.extensions import db

bp = APIBlueprint("health", __name__, tag="Health")


@bp.get("/healthz")
@bp.doc(summary="The process is alive (no database check)")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
@bp.doc(summary="The database answers", responses={200: "Ready", 503: "Database unreachable or not answering"})
def readyz():
    deadlines = current_app.extensions["db_deadlines"]
    try:
        with deadline(deadlines.ping_s, probe=True), db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        timed_out = isinstance(getattr(exc, "orig", None), DatabaseTimeout)
        return error_response(
            503,
            "The database did not answer in time" if timed_out else "The database is unreachable",
            code="not_ready",
            details={"database": "DatabaseTimeout" if timed_out else type(exc).__name__},
            headers={"Retry-After": "2"},
        )
    return {"status": "ready", "database": "ok"}
