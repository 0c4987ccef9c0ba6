"""Sentry events from the app, received on a local port in Sentry's envelope protocol."""
from __future__ import annotations

import pytest
import sentry_sdk

from service.observability import sentry as sentry_module
from service.observability.sentry import scrub
from tests.sentry_receiver import SentryReceiver

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
        "/explode", json={"title": "t", "password": PASSWORD},
        headers={"X-Request-ID": "sentry-req-1", "Authorization": f"Bearer {TOKEN}",
                 "Cookie": f"session={PASSWORD}"})
    assert response.status_code == 500
    sentry_sdk.flush(5)
    [event] = receiver.wait_for(lambda e: e.get("tags", {}).get("request_id") == "sentry-req-1")
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert event["level"] == "error"
    raw = b"".join(receiver.raw).decode()
    assert "kaboom in a view" in raw  # the envelope was read: the absence below means something
    for secret in (PASSWORD, TOKEN):
        assert secret not in raw


def test_auth_bodies_never_leave_and_sensitive_keys_are_filtered():
    event = {
        "request": {"url": "http://h/auth/login", "data": {"email": "a@b.c", "password": PASSWORD},
                    "headers": {"Authorization": f"Bearer {TOKEN}", "Cookie": "x=1", "Accept": "*/*"},
                    "cookies": {"session": "abc"}},
        "extra": {"api_token": "t0k3n", "note": f"got Bearer {TOKEN}", "count": 3},
        "breadcrumbs": {"values": [{"message": f"password={PASSWORD}"}]},
    }
    cleaned = scrub(event)
    assert "data" not in cleaned["request"] and "cookies" not in cleaned["request"]
    assert cleaned["request"]["headers"] == {"Authorization": "[Filtered]", "Cookie": "[Filtered]",
                                             "Accept": "*/*"}
    assert cleaned["extra"]["api_token"] == "[Filtered]" and cleaned["extra"]["count"] == 3
    assert TOKEN not in str(cleaned) and PASSWORD not in str(cleaned)


def test_degraded_reports_are_rate_limited_per_kind(monkeypatch):
    monkeypatch.setattr(sentry_module, "_last_sent", {})
    first = scrub({"message": "pool", "extra": {"event": "db_pool_timeout"}})
    second = scrub({"message": "pool", "extra": {"event": "db_pool_timeout"}})
    other = scrub({"message": "crash", "extra": {"event": "worker_died"}})
    again = scrub({"message": "crash", "extra": {"event": "worker_died"}})
    assert first is not None and second is None
    assert other is not None and again is not None  # worker deaths are never dropped
