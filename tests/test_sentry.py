"""Sentry events from the app, received on a local port in Sentry's envelope protocol."""

from __future__ import annotations

import json
import os
import sys

import pytest
import requests
import sentry_sdk

from bench.harness.commands import run_command
from bench.harness.sentry_receiver import SentryReceiver
from service.observability import sentry_rate_limit
from service.observability.sentry import before_send, mask_query, scrub

PASSWORD = "hunter2-very-secret"
TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI0MiIsImV4cCI6OTk5OTk5OTk5OX0.c2lnbmF0dXJlLXBhcnQ"
# Credentials in places no name-based rule knows: a query value under an innocent key, a custom header.
APIKEY = "ak-7f3e9c1d2b4a"
SIG = "sg-0d1e2f3a4b5c"
X_AUTH = "xa-9a8b7c6d5e4f"
QUERY = f"apikey={APIKEY}&sig={SIG}"
# Allowed headers whose values must arrive (so the absence of the others means something).
USER_AGENT = "leak-check/1.0"
ACCEPT = "application/vnd.leak-check+json"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class FixedClock:
    """Monotonic seconds that move only when the test moves them."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """The rate limiter on a clock of the test's, with nothing remembered."""
    fixed = FixedClock()
    monkeypatch.setattr(sentry_rate_limit.limiter, "clock", fixed)
    sentry_rate_limit.limiter.reset()
    yield fixed
    sentry_rate_limit.limiter.reset()


@pytest.fixture
def receiver(clock):
    with SentryReceiver() as receiver:
        yield receiver
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.init()  # no DSN: an inactive client for the rest of the session


def hostile_request_headers(request_id: str) -> dict:
    return {
        "X-Request-ID": request_id,
        "X-Auth": X_AUTH,
        "User-Agent": USER_AGENT,
        "Accept": ACCEPT,
        "Authorization": f"Bearer {TOKEN}",
    }


def assert_request_scrubbed(event: dict, raw: str) -> None:
    """Query values, the custom header and the token absent from the bytes Sentry received; the
    allowed headers present with their values."""
    request = event["request"]
    assert request["query_string"] == "apikey=[Filtered]&sig=[Filtered]"
    assert request["headers"]["X-Auth"] == "[Filtered]"
    assert request["headers"]["User-Agent"] == USER_AGENT and request["headers"]["Accept"] == ACCEPT
    assert request["headers"]["Content-Type"] == "application/json"
    for secret in (APIKEY, SIG, X_AUTH, TOKEN):
        assert secret not in raw
    assert USER_AGENT in raw and ACCEPT in raw


def test_unhandled_exception_is_reported_with_request_id_and_no_secrets(make_app, receiver):
    app = make_app(SENTRY_DSN=receiver.dsn, SENTRY_TRACES_SAMPLE_RATE="0")

    @app.post("/explode")
    def explode():
        raise RuntimeError("kaboom in a view")

    response = app.test_client().post(
        f"/explode?{QUERY}",
        json={"title": "t", "password": PASSWORD},
        headers={
            **hostile_request_headers("sentry-req-1"),
            "Cookie": f"session={PASSWORD}",
            "traceparent": TRACEPARENT,
        },
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
    # the caller's W3C trace is the event's, with this request's span under the caller's
    trace = event["contexts"]["trace"]
    assert trace["trace_id"] == TRACE_ID and trace["parent_span_id"] == "00f067aa0ba902b7"
    assert trace["span_id"] == response.headers["traceresponse"].split("-")[2]
    raw = b"".join(receiver.raw).decode()
    assert "kaboom in a view" in raw  # the envelope was read: the absence below means something
    assert_request_scrubbed(event, raw)
    assert PASSWORD not in raw


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
            "TEST_QUERY": QUERY,
            "TEST_HEADERS": json.dumps({**hostile_request_headers("traced-req"), "traceparent": TRACEPARENT}),
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
    # the caller's W3C trace is Sentry's trace, on the error and on the request's transaction
    assert event["contexts"]["trace"]["trace_id"] == transaction["contexts"]["trace"]["trace_id"] == TRACE_ID
    assert [span["description"] for span in transaction["spans"] if span.get("op") == "db"] == ["SELECT 1"]
    raw = b"".join(receiver.raw).decode()
    assert "kaboom with tracing" in raw
    assert_request_scrubbed(event, raw)
    assert_request_scrubbed(transaction, raw)  # the transaction describes the request too


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


def test_headers_go_by_allowlist_and_every_query_value_is_masked_in_the_url_too():
    headers = {
        "Host": "api.example.com",
        "User-Agent": USER_AGENT,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": "203.0.113.7",
        "X-Auth": X_AUTH,
        "X-Custom-Credential": "anything",
        "Referer": f"https://app.example.com/?{QUERY}",
    }
    event = {
        "request": {
            "url": f"http://api.example.com/books/?{QUERY}",
            "query_string": QUERY + "&flag&=odd",
            "headers": headers,
            "env": {"SERVER_NAME": "api", "SERVER_PORT": "5000", "REMOTE_ADDR": "203.0.113.7"},
        }
    }
    cleaned = scrub(event)["request"]
    assert cleaned["headers"] == {
        "Host": "api.example.com",
        "User-Agent": USER_AGENT,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": "[Filtered]",
        "X-Auth": "[Filtered]",
        "X-Custom-Credential": "[Filtered]",
        "Referer": "[Filtered]",
    }
    assert cleaned["query_string"] == "apikey=[Filtered]&sig=[Filtered]&[Filtered]&=[Filtered]"
    assert cleaned["url"] == "http://api.example.com/books/?apikey=[Filtered]&sig=[Filtered]"
    assert cleaned["env"] == {"SERVER_NAME": "api", "SERVER_PORT": "5000"}
    assert mask_query("") == "" and mask_query("a=1&&b=") == "a=[Filtered]&b=[Filtered]"


def test_degraded_reports_are_rate_limited_per_kind(clock):
    first = before_send({"message": "pool", "extra": {"event": "db_pool_timeout"}})
    second = before_send({"message": "pool", "extra": {"event": "db_pool_timeout"}})
    other = before_send({"message": "crash", "extra": {"event": "worker_died"}})
    again = before_send({"message": "crash", "extra": {"event": "worker_died"}})
    assert first is not None and second is None
    assert other is not None and again is not None  # worker deaths are never dropped
    clock.now += sentry_rate_limit.RATE_LIMIT_SECONDS
    later = before_send({"message": "pool", "extra": {"event": "db_pool_timeout"}})
    assert later is not None and later["extra"][sentry_rate_limit.SUPPRESSED] == 1


def test_repeated_unhandled_errors_are_one_event_a_minute_and_different_ones_all_go_out(make_app, receiver, clock):
    app = make_app(SENTRY_DSN=receiver.dsn, SENTRY_TRACES_SAMPLE_RATE="0")

    @app.get("/same-bug")
    def same_bug():
        raise RuntimeError("the same bug every time")

    @app.get("/other-bug")
    def other_bug():
        raise KeyError("another bug")

    client = app.test_client()
    for i in range(20):
        assert client.get("/same-bug", headers={"X-Request-ID": f"same-{i}"}).status_code == 500
    assert client.get("/other-bug", headers={"X-Request-ID": "other-0"}).status_code == 500
    sentry_sdk.flush(5)  # everything captured so far is at the receiver
    [same] = [e for e in receiver.errors() if e.get("transaction") == "/same-bug"]
    [other] = [e for e in receiver.errors() if e.get("transaction") == "/other-bug"]
    assert same["tags"]["request_id"] == "same-0" and other["tags"]["request_id"] == "other-0"
    assert sentry_rate_limit.SUPPRESSED not in same.get("extra", {})

    clock.now += sentry_rate_limit.RATE_LIMIT_SECONDS  # a minute later, the next one goes out
    assert client.get("/same-bug", headers={"X-Request-ID": "same-later"}).status_code == 500
    sentry_sdk.flush(5)
    [later] = receiver.wait_for(lambda e: e.get("tags", {}).get("request_id") == "same-later")
    assert later["extra"][sentry_rate_limit.SUPPRESSED] == 19
    assert len([e for e in receiver.errors() if e.get("transaction") == "/same-bug"]) == 2


def test_without_tracing_a_request_that_raises_nothing_sends_nothing_and_leaves_no_scope_data(make_app, receiver):
    """The default mode adds no per-request state: an event captured outside a request, after
    requests were served on this thread, carries no request and no request id."""
    app = make_app(SENTRY_DSN=receiver.dsn, SENTRY_TRACES_SAMPLE_RATE="0")
    client = app.test_client()
    for _ in range(3):
        assert client.get("/books/", headers={"X-Request-ID": "quiet-req"}).status_code == 200
    # An outgoing http.client call of this process (the stdlib integration would keep it as a
    # breadcrumb on the thread, for every later event): breadcrumbs are off in this mode.
    requests.get(f"http://127.0.0.1:{receiver.port}/books/?quiet-req", timeout=10)
    sentry_sdk.capture_message("outside any request")
    sentry_sdk.flush(5)
    [event] = receiver.wait_for(lambda e: e.get("message") == "outside any request")
    assert "request" not in event and "request_id" not in event.get("tags", {})
    assert "quiet-req" not in json.dumps(event) and "/books/" not in json.dumps(event), json.dumps(event, indent=1)
    assert receiver.transactions() == []
