"""Liveness and readiness: `/healthz` never touches the database, `/readyz` only does."""

from __future__ import annotations

from apiflask import APIBlueprint
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.errors import error_response
from service.extensions import db

bp = APIBlueprint("health", __name__, tag="Health")


@bp.get("/healthz")
@bp.doc(summary="The process is alive (no database check)")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
@bp.doc(summary="The database answers", responses={200: "Ready", 503: "Database unreachable"})
def readyz():
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return error_response(
            503,
            "The database is unreachable",
            code="not_ready",
            details={"database": type(exc).__name__},
            headers={"Retry-After": "2"},
        )
    return {"status": "ready", "database": "ok"}
