"""Request guards: before_request checks that refuse a request before any view runs, answered
in the one error shape (errors.py)."""

from __future__ import annotations

from flask import Response, request

from service.errors import error_response

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def require_json_body() -> Response | None:
    """Refuse bodies that are not JSON before any view runs, so nothing half-parsed is written."""
    if request.method not in BODY_METHODS or request.url_rule is None:
        return None
    if request.mimetype != "application/json":
        return error_response(
            415, "Content-Type must be application/json", details={"content_type": request.mimetype or None}
        )
    try:
        request.get_json()
    except Exception as exc:  # werkzeug's BadRequest for undecodable JSON, or 413 for huge bodies
        if getattr(exc, "code", None) == 413:
            raise
        return error_response(400, "Request body is not valid JSON")
    return None
