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

Nothing secret leaves the process: `scrub` runs on every event and transaction, in both modes,
and is the one place that decides what of the request goes out. Headers by allowlist
(ALLOWED_HEADERS): any other header keeps its name, its value becomes "[Filtered]", so a new
credential header (X-Auth, X-Api-Key, a proxy's) is masked without anyone listing it. Every
query-string value is masked, keys kept (`apikey=[Filtered]&sig=[Filtered]`), in `query_string`
and in `url` alike. Cookies, the WSGI environ beyond server name and port, auth-route bodies go;
then any value under a sensitive key or that looks like a token (logging_conf/redaction.py,
shared with the log lines). `before_send` then holds back repeats (sentry_rate_limit.py): a
degraded-mode report or the same exception at the same place and route, once a minute per
process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import sentry_sdk
from flask import Flask, g, has_request_context, request
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration
from sentry_sdk.integrations.threading import ThreadingIntegration

from logging_conf.redaction import FILTERED, scrub_value
from service.observability import sentry_rate_limit
from service.settings import Settings

log = logging.getLogger(__name__)

# Request headers whose values go to Sentry; every other one is masked. What they tell about a
# failed request (who called, with what body, through which proxy scheme, which request) and
# none can hold a credential. Left out on purpose: X-Forwarded-For and X-Real-IP (the client's
# address, personal data; user_info is off for the same reason), Referer (a URL, with whatever
# its query carried), Origin, Forwarded, tracestate (a vendor's opaque state, kept on the trace
# context only when valid), and anything custom.
ALLOWED_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "content-length",
        "content-type",
        "host",
        "transfer-encoding",
        "traceparent",
        "user-agent",
        "x-forwarded-proto",
        "x-request-id",
    }
)
ALLOWED_ENV = frozenset({"SERVER_NAME", "SERVER_PORT"})  # the SDK's request `env`

_request_context_registered = False  # per process; a forked worker inherits it with the scope
_fork_reset_registered = False


def init(settings: Settings) -> bool:
    """Initialise once per process tree (the master, with preload; workers inherit it)."""
    if not settings.sentry_dsn:
        return False
    _register_request_context()
    _register_fork_reset()
    client = sentry_sdk.get_client()
    if client.is_active() and client.dsn == settings.sentry_dsn:
        return True  # already set up in this process (the app factory ran twice)
    tracing = settings.sentry_traces_sample_rate > 0
    # sentry_logs_level=None: no Sentry Logs handler, which every record went through (taking a
    # handler lock) only to find `enable_logs` off.
    if tracing:
        integrations = [
            FlaskIntegration(transaction_style="url"),
            SqlalchemyIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.WARNING, sentry_logs_level=None),
        ]
    else:
        integrations = [
            LoggingIntegration(level=None, event_level=logging.WARNING, sentry_logs_level=None),
            # gthread hands every request to a thread pool, whose `submit` the integration wraps to
            # fork two scopes for the task: per request, for scopes nothing writes to in this
            # mode. Threads' uncaught exceptions are still reported.
            ThreadingIntegration(propagate_scope=False),
        ]
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment or settings.env,
        release=f"flaskapi-observability@{settings.version}",
        # 0 means no tracing machinery at all (None), not "trace nothing" (which still pays per request)
        traces_sample_rate=settings.sentry_traces_sample_rate or None,
        # No user identity, no request bodies at all, no local variables of stack frames
        # (a frame of the login view holds the password); headers still pass through `scrub`.
        data_collection={"user_info": False, "http_bodies": [], "stack_frame_variables": False},
        # Without tracing there is no scope per request, so a breadcrumb (an outgoing http.client
        # call, from the stdlib integration) would land on every later event of the thread,
        # whichever request it belongs to: none are kept.
        max_breadcrumbs=sentry_sdk.consts.DEFAULT_MAX_BREADCRUMBS if tracing else 0,
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
            # the request's transaction (and the spans it starts from now on) in our W3C trace
            trace, span = g.get("trace"), sentry_sdk.get_current_span()
            if trace is not None and span is not None:
                span.trace_id = trace.trace_id


def _request_context(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """The request id, and without tracing the request data the Flask integration would
    attach, read when an event is captured (registered once per process, by `init`).

    Events are captured on the thread serving the request, so `request` is that request.
    Headers and query are copied as sent: `scrub`, which runs after, decides what of them leaves
    (the same for the Flask integration's copy). Bodies are never attached.
    """
    if not has_request_context():
        return event
    event.setdefault("tags", {}).setdefault("request_id", g.get("request_id"))
    if sentry_sdk.get_client().get_integration(FlaskIntegration) is not None:
        return event  # tracing mode: the integration describes the request, its span our trace
    trace = g.get("trace")
    if trace is not None:
        join_trace(event, trace)
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


def join_trace(event: dict[str, Any], trace) -> dict[str, Any]:
    """The event's trace is the request's W3C trace (trace_context.py): Sentry's trace id is
    the one on the log lines, the error body and `traceresponse`, so `trace:<id>` in Sentry
    finds the event of a trace id grepped from the logs. sentry-sdk continues only its own
    `sentry-trace` and `baggage` headers, never `traceparent`; without tracing there is no
    scope per request whose propagation context could hold it (the scopes are shared by the
    requests a thread serves), so it is written on the event, when one is captured: nothing
    per request. (Also the report of a worker aborted for timeout: worker_timeouts.py.)"""
    context = event.setdefault("contexts", {}).setdefault("trace", {})
    context["trace_id"] = trace.trace_id
    context["span_id"] = trace.span_id
    if trace.parent_id is not None:
        context["parent_span_id"] = trace.parent_id
    else:
        context.pop("parent_span_id", None)
    if trace.tracestate is not None:
        context.setdefault("data", {})["tracestate"] = trace.tracestate
    return event


def _register_request_context() -> None:
    """The global scope outlives every sentry_sdk.init in the process (and is copied into the
    workers forked from a preloaded master): one registration serves all."""
    global _request_context_registered
    if not _request_context_registered:
        sentry_sdk.get_global_scope().add_event_processor(_request_context)
        _request_context_registered = True


def _register_fork_reset() -> None:
    global _fork_reset_registered
    if not _fork_reset_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_own_transport_in_child)
        _fork_reset_registered = True


def _own_transport_in_child() -> None:
    """In a forked process (a gunicorn worker): a transport of its own, with an empty queue and
    no connection of the master's.

    The SDK's background worker restarts its thread in a child but keeps the queue it copied:
    an event the master had not sent yet (its report of a death, queued behind a slow send) was
    sent again by the worker forked meanwhile, on that worker's first event. The copied
    connection pool would share the master's keep-alive sockets. (The SDK's batchers and
    monitor reset themselves at fork the same way; its transport does not.)"""
    from sentry_sdk.transport import make_transport

    client = sentry_sdk.get_client()
    if not client.is_active() or client.transport is None:
        return
    client.transport = make_transport(client.options)
    if getattr(client, "monitor", None) is not None:
        client.monitor.transport = client.transport


def flush(timeout: float = 2.0) -> None:
    """Block until queued events are sent or `timeout` passed (callers choose a bound)."""
    if sentry_sdk.get_client().is_active():
        sentry_sdk.flush(timeout)


def before_send(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Every error event: scrubbed, then held back if it repeats one sent within the minute."""
    return sentry_rate_limit.admit(scrub(event, hint))


def scrub(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """`event` with the request reduced to what may leave (module doc), then without values
    under sensitive keys or token-like text anywhere."""
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("cookies", None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {
                name: value if str(name).lower() in ALLOWED_HEADERS else FILTERED for name, value in headers.items()
            }
        env = request.get("env")
        if isinstance(env, dict):
            request["env"] = {key: value for key, value in env.items() if key in ALLOWED_ENV}
        query = request.get("query_string")
        if query:
            request["query_string"] = mask_query(query if isinstance(query, str) else str(query))
        url = request.get("url")
        if isinstance(url, str) and "?" in url:
            base, _, query = url.partition("?")
            request["url"] = f"{base}?{mask_query(query)}"
        if "/auth/" in str(request.get("url", "")):
            request.pop("data", None)  # credentials live in auth bodies
    return scrub_value(event)  # sensitive header names are keys too: Authorization, Cookie


def mask_query(query: str) -> str:
    """Every value of a query string replaced by FILTERED, the keys kept: `a=1&b` becomes
    `a=[Filtered]&[Filtered]` (a part without `=` may itself be the secret)."""
    parts = []
    for part in query.split("&"):
        if part:
            key, equals, _ = part.partition("=")
            parts.append(f"{key}={FILTERED}" if equals else FILTERED)
    return "&".join(parts)
