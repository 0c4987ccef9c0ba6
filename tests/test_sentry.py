"""Sentry events from the app, received on a local port in Sentry's envelope protocol."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import sentry_sdk

from bench.harness.commands import run_command
from bench.harness.sentry_receiver import SentryReceiver
from service.observability import sentry_rate_limit
from service.observability.sentry import before_send, scrub

PASSWORD = "hunter2-very-secret"
TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI0MiIsImV4cCI6OTk5OTk5OTk5OX0.c2lnbmF0dXJlLXBhcnQ"


@pytest.fixture
def receiver():
    with SentryReceiver() as receiver:
        yield receiver
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.init()  # no DSN: an inactive client for the rest of the session


def test_unhandled_exception_is_reported_with_request_id_and_no_secrets(make_app, receiver):
    app = make_app(SENTRY_DSN=receiver.dsn, SENTRY_TRACES_SAMPLE_RATE="0")

    @app.post("/explode")
    def explode():
        raise RuntimeError("kaboom in a view")

    response = app.test_client().post(
        "/explode",
        json={"title": "t", "password": PASSWORD},
        headers={"X-Request-ID": "sentry-req-1", "Authorization": f"Bearer {TOKEN}", "Cookie": f"session={PASSWORD}"},
    )
    assert response.status_code == 500
    sentry_sdk.flush(5)
    [event] = receiver.wait_for(lambda e: e.get("tags", {}).get("request_id") == "sentry-req-1")
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert event["level"] == "error"
    # The request as the Flask integration would describe it, in both modes
    assert event["request"]["url"] == "http://localhost/explode"
    assert event["request"]["method"] == "POST"
    assert event["request"]["headers"]["X-Request-Id"] == "sentry-req-1"
    assert event["request"]["headers"]["Authorization"] == "[Filtered]"
    assert "data" not in event["request"]
    assert event["transaction"] == "/explode"
    assert receiver.transactions() == []  # tracing is off: no transaction per request
    raw = b"".join(receiver.raw).decode()
    assert "kaboom in a view" in raw  # the envelope was read: the absence below means something
    for secret in (PASSWORD, TOKEN):
        assert secret not in raw


# sentry-sdk installs an integration once per process, and never after it was disabled there:
# the tracing mode (Flask and SQLAlchemy integrations on) is checked in a process of its own.
TRACING_PROGRAM = "tests.programs.sentry_tracing"


def test_with_tracing_the_sdk_integrations_report_the_error_and_its_transaction(database_uri, tmp_path, receiver):
    result = run_command(
        [sys.executable, "-m", TRACING_PROGRAM],
        {
            **os.environ,
            "TEST_DB_URI": database_uri,
            "TEST_TMP": str(tmp_path),
            "TEST_DSN": receiver.dsn,
            "TEST_TOKEN": TOKEN,
        },
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    [event] = receiver.wait_for(lambda e: e.get("tags", {}).get("request_id") == "traced-req")
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert event["request"]["method"] == "POST" and event["transaction"] == "/explode"
    assert event["request"]["headers"]["Authorization"] == "[Filtered]"
    [transaction] = receiver.wait_for(lambda e: e["transaction"] == "/explode", transactions=True)
    assert transaction["tags"]["request_id"] == "traced-req"
    assert [span["description"] for span in transaction["spans"] if span.get("op") == "db"] == ["SELECT 1"]
    raw = b"".join(receiver.raw).decode()
    assert "kaboom with tracing" in raw and TOKEN not in raw


def test_auth_bodies_never_leave_and_sensitive_keys_are_filtered():
    event = {
        "request": {
            "url": "http://h/auth/login",
            "data": {"email": "a@b.c", "password": PASSWORD},
            "headers": {"Authorization": f"Bearer {TOKEN}", "Cookie": "x=1", "Accept": "*/*"},
            "cookies": {"session": "abc"},
        },
        "extra": {"api_token": "t0k3n", "note": f"got Bearer {TOKEN}", "count": 3},
        "breadcrumbs": {"values": [{"message": f"password={PASSWORD}"}]},
    }
    cleaned = scrub(event)
    assert "data" not in cleaned["request"] and "cookies" not in cleaned["request"]
    assert cleaned["request"]["headers"] == {"Authorization": "[Filtered]", "Cookie": "[Filtered]", "Accept": "*/*"}
    assert cleaned["extra"]["api_token"] == "[Filtered]" and cleaned["extra"]["count"] == 3
    assert TOKEN not in str(cleaned) and PASSWORD not in str(cleaned)


def test_degraded_reports_are_rate_limited_per_kind(monkeypatch):
    monkeypatch.setattr(sentry_rate_limit, "_last_sent", {})
    # The limiter's clock, pinned: the verdict cannot depend on how long the calls take.
    monkeypatch.setattr(sentry_rate_limit, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    first = before_send({"message": "pool", "extra": {"event": "db_pool_timeout"}})
    second = before_send({"message": "pool", "extra": {"event": "db_pool_timeout"}})
    other = before_send({"message": "crash", "extra": {"event": "worker_died"}})
    again = before_send({"message": "crash", "extra": {"event": "worker_died"}})
    assert first is not None and second is None
    assert other is not None and again is not None  # worker deaths are never dropped


def test_without_tracing_a_request_that_raises_nothing_sends_nothing_and_leaves_no_scope_data(make_app, receiver):
    """The default mode adds no per-request state: an event captured outside a request, after
    requests were served on this thread, carries no request and no request id."""
    app = make_app(SENTRY_DSN=receiver.dsn, SENTRY_TRACES_SAMPLE_RATE="0")
    client = app.test_client()
    for _ in range(3):
        assert client.get("/books/", headers={"X-Request-ID": "quiet-req"}).status_code == 200
    sentry_sdk.capture_message("outside any request")
    sentry_sdk.flush(5)
    [event] = receiver.wait_for(lambda e: e.get("message") == "outside any request")
    assert "request" not in event and "request_id" not in event.get("tags", {})
    assert "quiet-req" not in json.dumps(event) and "/books/" not in json.dumps(event)
    assert receiver.transactions() == []
