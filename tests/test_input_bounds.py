"""The WSGI guards in-process (service/guards.py): unknown methods answered 405 before Flask, and
bodies whole and within MAX_CONTENT_LENGTH or refused. The same on a real gunicorn:
test_input_bounds_stack.py."""

from __future__ import annotations

import io
import json
import logging

import pytest
from sqlalchemy import text
from werkzeug.test import EnvironBuilder, run_wsgi_app

from service.extensions import db
from service.guards import SERVED_METHODS
from tests.test_errors import assert_error

LIMIT = 64 * 1024


class Response:
    """What run_wsgi_app gives back, read as the test client's responses are."""

    def __init__(self, app, environ) -> None:
        body, status, headers = run_wsgi_app(app, environ, buffered=True)
        self.status_code = int(status.split()[0])
        self.headers = headers
        self.mimetype = headers.get("Content-Type", "").split(";")[0]
        self.raw = b"".join(body)

    def get_data(self, as_text: bool = False):
        return self.raw.decode() if as_text else self.raw

    def get_json(self):
        return json.loads(self.raw)


class CountingStream(io.BytesIO):
    """A request body that remembers how much of it was read."""

    def __init__(self, data: bytes = b"", *, fail: type[Exception] | None = None) -> None:
        super().__init__(data)
        self.fail = fail

    def read(self, size=-1):
        if self.fail is not None:
            raise self.fail("simulated")
        return super().read(size)


def environ_for(path: str, *, method: str = "POST", body: bytes = b"", chunked: bool = False, **kwargs) -> dict:
    environ = EnvironBuilder(path=path, method=method, **kwargs).get_environ()
    environ["wsgi.input"] = CountingStream(body) if not isinstance(body, CountingStream) else body
    if chunked:  # as gunicorn hands over a chunked body: no Content-Length, the stream terminated
        environ.pop("CONTENT_LENGTH", None)
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(len(environ["wsgi.input"].getvalue()))
    return environ


@pytest.fixture
def auth(login):
    return login("bounds@example.com", "bounds-password")


def book_count(app) -> int:
    with app.app_context(), db.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM books")).scalar_one()


def json_post(path: str, body: bytes, auth: dict, **kwargs) -> dict:
    headers = {"Content-Type": "application/json", **auth}
    return environ_for(path, body=body, headers=headers, **kwargs)


# --- methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("CARD001", "/books/1", {"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"}),
        ("PURGE", "/books/", {"GET", "HEAD", "OPTIONS", "POST"}),
        ("TRACE", "/auth/login", {"OPTIONS", "POST"}),
        ("get", "/books/", {"GET", "HEAD", "OPTIONS", "POST"}),  # methods are case-sensitive
        ("Post", "/books/", {"GET", "HEAD", "OPTIONS", "POST"}),
        ("BREW", "/no/such/path", set(SERVED_METHODS)),  # no route: every method the API serves
    ],
)
def test_an_unknown_method_is_405_with_allow(client, method, path, allowed):
    response = client.open(path, method=method, headers={"X-Request-ID": "probe-1"})
    error = assert_error(response, 405, "method_not_allowed")
    assert method in error["message"]
    assert error["request_id"] == "probe-1" and response.headers["X-Request-ID"] == "probe-1"
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed


def test_the_refusal_is_one_access_line_with_the_method_escaped(app, caplog):
    method = "BAD\x07\x1b[31m" + "X" * 60
    with caplog.at_level(logging.INFO, logger="service.access"):
        response = Response(app, environ_for("/books/%E2%9C%93", method=method))
    error = assert_error(response, 405, "method_not_allowed")
    [record] = [r for r in caplog.records if r.name == "service.access"]
    assert record.method == "BAD\\x07\\x1b[31m" + "X" * 23 + "..."
    assert record.method in error["message"]
    assert "\x07" not in response.get_data(as_text=True)
    assert (record.path, record.status, record.route, record.user_id) == ("/books/\u2713", 405, None, None)
    assert record.request_id == error["request_id"] and record.response_bytes == len(response.raw)


def test_an_unknown_method_reaches_no_hook(app):
    seen = []
    app.before_request(lambda: seen.append("hook"))
    assert app.test_client().open("/books/", method="PROPFIND").status_code == 405
    assert seen == []
    assert app.test_client().get("/books/").status_code == 200
    assert seen == ["hook"]


# --- bodies with Content-Length -----------------------------------------------------------------


def test_a_body_within_the_limit_passes_untouched(app):
    """No copy, no read: the app reads the server's own stream."""
    captured = {}

    @app.post("/__echo")
    def echo():
        from flask import request

        captured["stream"] = request.environ["wsgi.input"]
        return {"size": len(request.get_data())}

    body = CountingStream(b"{}" + b" " * (LIMIT - 2))
    environ = environ_for("/__echo", body=body, headers={"Content-Type": "application/json"})
    response = Response(app, environ)
    assert response.get_json() == {"size": LIMIT}
    assert captured["stream"] is body


def test_an_oversized_body_is_drained_then_413(app, auth):
    size = 5 * 1024 * 1024
    body = CountingStream(b"x" * size)
    before = book_count(app)
    response = Response(app, json_post("/books/", body, auth))
    error = assert_error(response, 413, "payload_too_large")
    assert str(LIMIT) in error["message"] and error["request_id"]
    assert body.tell() == size  # read to its end: the connection is at a request boundary
    assert book_count(app) == before


def test_a_body_beyond_the_drain_bound_is_not_read(make_app, login):
    app = make_app(MAX_DRAIN_BYTES=str(1024 * 1024))
    client = app.test_client()
    client.post("/auth/register", json={"email": "big@example.com", "password": "big-password"})
    token = client.post("/auth/login", json={"email": "big@example.com", "password": "big-password"}).get_json()
    body = CountingStream(b"x" * (1024 * 1024 + 1))
    response = Response(app, json_post("/books/", body, {"Authorization": f"Bearer {token['token']}"}))
    assert_error(response, 413, "payload_too_large")
    assert body.tell() == 0


@pytest.mark.parametrize("method, path", [("GET", "/books/"), ("DELETE", "/books/1"), ("GET", "/nope")])
def test_an_oversized_body_is_413_whatever_the_route(client, method, path):
    response = client.open(path, method=method, data=b"x" * (LIMIT + 1))
    assert_error(response, 413, "payload_too_large")


# --- chunked bodies -----------------------------------------------------------------------------


def test_a_chunked_body_within_the_limit_is_served(app, auth):
    body = json.dumps({"title": "Chunked"}).encode()
    response = Response(app, json_post("/books/", body, auth, chunked=True))
    assert response.status_code == 201, response.raw
    assert response.get_json()["title"] == "Chunked"


def test_a_chunked_body_just_over_the_limit_is_413_not_truncated(app, auth):
    valid = b'{"title": "truncated"}'
    body = valid + b" " * (LIMIT - len(valid)) + b"garbage"
    before = book_count(app)
    response = Response(app, json_post("/books/", body, auth, chunked=True))
    assert_error(response, 413, "payload_too_large")
    assert book_count(app) == before


def test_a_chunked_body_exactly_at_the_limit_is_served(app, auth):
    valid = b'{"title": "at the limit"}'
    body = valid + b" " * (LIMIT - len(valid))
    response = Response(app, json_post("/books/", body, auth, chunked=True))
    assert response.status_code == 201, response.raw


def test_an_oversized_chunked_body_is_drained_up_to_the_bound(make_app, login):
    app = make_app(MAX_DRAIN_BYTES=str(1024 * 1024))
    client = app.test_client()
    client.post("/auth/register", json={"email": "chunky@example.com", "password": "chunky-password"})
    token = client.post("/auth/login", json={"email": "chunky@example.com", "password": "chunky-password"})
    auth = {"Authorization": f"Bearer {token.get_json()['token']}"}
    small, large = CountingStream(b"x" * (512 * 1024)), CountingStream(b"x" * (3 * 1024 * 1024))
    for body in (small, large):
        assert_error(Response(app, json_post("/books/", body, auth, chunked=True)), 413, "payload_too_large")
    assert small.tell() == 512 * 1024  # to its end
    assert large.tell() == 1024 * 1024  # to the bound, then the connection closes
    assert book_count(app) == 0


@pytest.mark.parametrize(
    "failure, status, code",
    [(ValueError, 400, "bad_request"), (ConnectionResetError, 400, "bad_request"), (TimeoutError, 408, None)],
)
def test_an_unreadable_chunked_body_is_4xx_and_writes_nothing(app, auth, failure, status, code):
    body = CountingStream(b'{"title": "never"}', fail=failure)
    response = Response(app, json_post("/books/", body, auth, chunked=True))
    assert_error(response, status, code)
    assert book_count(app) == 0


def test_a_chunked_body_the_server_does_not_terminate_is_not_read(app, auth):
    """Without wsgi.input_terminated a chunked stream may never end: Werkzeug reads it as empty
    and so do the guards."""
    body = CountingStream(json.dumps({"title": "unterminated"}).encode())
    environ = json_post("/books/", body, auth, chunked=True)
    del environ["wsgi.input_terminated"]
    response = Response(app, environ)
    assert_error(response, 400, "bad_request")  # an empty body is not JSON
    assert body.tell() == 0
