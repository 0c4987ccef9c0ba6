"""Crash reports to Sentry (sentry-sdk), on only when SENTRY_DSN is set.

Two modes, chosen by SENTRY_TRACES_SAMPLE_RATE:
- tracing on (> 0): the Flask, logging and SQLAlchemy integrations, as the SDK ships them:
  a transaction per request, query spans, a scope forked per request;
- tracing off (the default): the logging integration only, and `_request_context`, a global
  event processor that reads the request at capture time (URL, method, headers, route,
  request id). Errors carry the same request data, but a request that raises nothing costs
  nothing: the Flask integration's WSGI middleware forks a scope, starts a transaction and
  extracts the request on every request, raised or not, about 125 us of a 300 us list page
  (measured in-process). Breadcrumbs are off in this mode: with no scope per request they would
  mix requests; the request id joins an event to its log lines instead.

What becomes an event: every log record at WARNING or above (the logging integration), so the
log line and the Sentry event are the same fact with the same request id. The access log and
gunicorn's own error log are left out: the first would double every 5xx, and worker deaths are
reported by the master with structured tags instead (worker_exits.py).

Nothing secret leaves the process: `scrub` runs on every event and drops cookies, auth headers,
auth-route bodies, and any value under a sensitive key or that looks like a token (the rules are
logging_conf/redaction.py, shared with the log lines). `before_send` then drops repeated
degraded-mode reports (sentry_rate_limit.py).
"""

from __future__ import annotations

import logging
from typing import Any

import sentry_sdk
from flask import Flask, g, has_request_context, request
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration

from logging_conf.redaction import scrub_value
from service.observability import sentry_rate_limit
from service.settings import Settings

log = logging.getLogger(__name__)

_request_context_registered = False  # per process; a forked worker inherits it with the scope


def init(settings: Settings) -> bool:
    """Initialise once per process tree (the master, with preload; workers inherit it)."""
    if not settings.sentry_dsn:
        return False
    _register_request_context()
    client = sentry_sdk.get_client()
    if client.is_active() and client.dsn == settings.sentry_dsn:
        return True  # already set up in this process (the app factory ran twice)
    tracing = settings.sentry_traces_sample_rate > 0
    if tracing:
        integrations = [
            FlaskIntegration(transaction_style="url"),
            SqlalchemyIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.WARNING),
        ]
    else:
        integrations = [LoggingIntegration(level=None, event_level=logging.WARNING)]
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment or settings.env,
        release=f"flaskapi-observability@{settings.version}",
        # 0 means no tracing machinery at all (None), not "trace nothing" (which still pays per request)
        traces_sample_rate=settings.sentry_traces_sample_rate or None,
        # No user identity, no request bodies at all, no local variables of stack frames
        # (a frame of the login view holds the password); headers still pass through `scrub`.
        data_collection={"user_info": False, "http_bodies": [], "stack_frame_variables": False},
        integrations=integrations,
        # Both would be auto-enabled (Flask and SQLAlchemy are installed). Without tracing,
        # SQLAlchemy's adds only a breadcrumb per query (~85 us a request, measured) and
        # Flask's is replaced by `_request_context`.
        disabled_integrations=[] if tracing else [FlaskIntegration, SqlalchemyIntegration],
        before_send=before_send,
        before_send_transaction=scrub,  # a transaction is never a degraded-mode report
    )
    ignore_logger("service.access")
    ignore_logger("gunicorn.error")
    ignore_logger("gunicorn.access")
    return True


def init_app(app: Flask, settings: Settings) -> None:
    if init(settings) and settings.sentry_traces_sample_rate > 0:
        # The request's transaction is sent after the request context is gone: tag its scope.
        @app.before_request
        def _tag_request_id() -> None:
            sentry_sdk.get_isolation_scope().set_tag("request_id", g.get("request_id"))


def _request_context(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """The request id, and without tracing the request data the Flask integration would
    attach, read when an event is captured (registered once per process, by `init`).

    Events are captured on the thread serving the request, so `request` is that request.
    Headers go out as sent; `scrub` filters the sensitive ones. Bodies are never attached.
    """
    if not has_request_context():
        return event
    event.setdefault("tags", {}).setdefault("request_id", g.get("request_id"))
    if sentry_sdk.get_client().get_integration(FlaskIntegration) is not None:
        return event  # tracing mode: the integration describes the request itself
    info = event.setdefault("request", {})
    info.update(
        url=request.base_url,
        method=request.method,
        headers=dict(request.headers),
        query_string=request.query_string.decode("latin-1"),
    )
    rule = request.url_rule
    if rule is not None and not event.get("transaction"):
        event["transaction"] = rule.rule
        event["transaction_info"] = {"source": "route"}
    return event


def _register_request_context() -> None:
    """The global scope outlives every sentry_sdk.init in the process (and is copied into the
    workers forked from a preloaded master): one registration serves all."""
    global _request_context_registered
    if not _request_context_registered:
        sentry_sdk.get_global_scope().add_event_processor(_request_context)
        _request_context_registered = True


def flush(timeout: float = 2.0) -> None:
    """Block until queued events are sent (before a deliberate os._exit)."""
    if sentry_sdk.get_client().is_active():
        sentry_sdk.flush(timeout)


def before_send(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Every error event: scrubbed, then dropped if it repeats a degraded-mode report."""
    event = scrub(event, hint)
    return None if sentry_rate_limit.rate_limited(event) else event


def scrub(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """`event` without cookies, auth-route bodies, values under sensitive keys or token-like text."""
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("cookies", None)
        url = str(request.get("url", ""))
        if "/auth/" in url:
            request.pop("data", None)  # credentials live in auth bodies
    return scrub_value(event)  # sensitive header names are keys too: Authorization, Cookie
