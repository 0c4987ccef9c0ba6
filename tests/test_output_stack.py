"""What leaves a real gunicorn besides the bodies: its log lines (no control character a client
sent reaches a reader raw) and its response headers (nosniff, no-store, no version), on the API
port and on the master's metrics port, talked to over loopback as a client would."""

from __future__ import annotations

import http.client
import json
import re
import socket
import uuid

import pytest
import requests

from bench.harness.gunicorn import serving
from bench.harness.polling import wait_for
from tests.test_logging import unsafe_characters

pytestmark = pytest.mark.stack

WORKERS = 2
IO_TIMEOUT = 30.0
NO_VERSION = re.compile(r"[A-Za-z-]+")  # a name, no "/1.2.3", no "CPython/3.11"


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    with serving(migrated_database("test_output"), tmp_path_factory.mktemp("output"), workers=WORKERS) as stack:
        yield stack


def send(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One request on its own connection: (status, [(name, value)] as sent, so a header sent
    twice shows twice)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheaders()
    finally:
        conn.close()


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


# --- log lines -----------------------------------------------------------------------------------

# (how it is sent, how the access line must show it): percent-encoded in the request line, as a
# client can; decoded by the server, they are real control characters in the path.
HOSTILE_PATHS = [
    ("GET", "/books/%0aINJECTED", "/books/\\nINJECTED"),
    ("GET", "/books/%0d%0a%7b%22level%22:%22ERROR%22%7d", '/books/\\r\\n{"level":"ERROR"}'),
    ("GET", "/books/%1b[31mred", "/books/\\x1b[31mred"),
    ("GET", "/books/%07%00%7f", "/books/\\x07\\x00\\x7f"),
    ("GET", "/books/%c2%85next", "/books/\\x85next"),
    ("GET", "/books/%e2%80%aereversed", "/books/\\u202ereversed"),
    ("GET", "/books/%e2%80%a8%e2%81%a6", "/books/\\u2028\\u2066"),
    # answered by the WSGI guard, outside Flask: its access line is written the same way
    ("BREW", "/books/%0aINJECTED", "/books/\\nINJECTED"),
]


def test_control_characters_a_client_sends_are_escaped_in_every_log_line(stack):
    sent = {}
    for method, path, shown in HOSTILE_PATHS:
        request_id = f"esc-{uuid.uuid4().hex[:12]}"
        status, _ = send(stack.port, method, path, {"X-Request-ID": request_id})
        assert status in (404, 405)
        sent[request_id] = shown

    def all_access_lines() -> dict[str, dict] | None:
        lines = [json.loads(line) for line in stack.log_file.read_text(encoding="utf-8").splitlines()]
        found = {d["request_id"]: d for d in lines if d.get("event") == "access" and d.get("request_id") in sent}
        return found if len(found) == len(sent) else None

    found = wait_for(all_access_lines, "the access lines of the requests sent")
    for request_id, shown in sent.items():
        assert found[request_id]["path"] == shown
        assert shown in found[request_id]["message"]
    # every line of the file (the master's and gunicorn's too): one JSON object, no unsafe character
    # in any string, so `jq -r` prints each field as one harmless line
    text = stack.log_file.read_text(encoding="utf-8")
    for line in text.splitlines():
        data = json.loads(line)
        assert unsafe_characters(data) == [], line
    assert "\x1b" not in text and "\u202e" not in text and "\x85" not in text


# --- response headers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token(stack) -> str:
    creds = {"email": f"headers-{uuid.uuid4().hex[:8]}@example.com", "password": "headers-password"}
    assert requests.post(stack.url + "/auth/register", json=creds, timeout=10).status_code == 201
    return requests.post(stack.url + "/auth/login", json=creds, timeout=10).json()["token"]


JSON = {"Content-Type": "application/json"}


def test_every_answer_has_nosniff_and_token_answers_are_not_stored(stack, token):
    auth = {"Authorization": f"Bearer {token}"}
    login = json.dumps({"email": "nobody@example.com", "password": "wrong-password"}).encode()
    # (method, path, headers, body, status, no-store expected)
    cases = [
        ("GET", "/healthz", {}, None, 200, False),
        ("GET", "/books/", {}, None, 200, False),
        ("GET", "/books/999999", {}, None, 404, False),
        ("DELETE", "/books/", {}, None, 405, False),  # Flask's 405
        ("BREW", "/books/", {}, None, 405, False),  # the WSGI guard's 405, outside Flask
        ("POST", "/books/", {**JSON, **auth}, b"x" * (64 * 1024 + 1), 413, True),
        ("POST", "/books/", {"Content-Type": "text/plain", **auth}, b"t", 415, True),
        ("POST", "/books/", JSON, b'{"title": "t"}', 401, False),
        ("GET", "/books/", auth, None, 200, True),  # answered for a user
        ("POST", "/books/", {**JSON, **auth}, b'{"title": "Dune"}', 201, True),
        ("POST", "/auth/login", JSON, login, 401, True),
        ("POST", "/auth/register", JSON, b"{}", 422, True),
        ("GET", "/auth/nothing-here", {}, None, 404, True),
        ("BREW", "/auth/login", {}, None, 405, True),
    ]
    for method, path, headers, body, status, private in cases:
        got, answer = send(stack.port, method, path, headers, body)
        what = f"{method} {path}"
        assert got == status, what
        assert values(answer, "X-Content-Type-Options") == ["nosniff"], what
        assert values(answer, "Cache-Control") == (["no-store"] if private else []), what
        [server] = values(answer, "Server")
        assert NO_VERSION.fullmatch(server), f"{what}: Server: {server}"

    # the login that hands out a token
    creds = json.dumps({"email": "reader-h@example.com", "password": "reader-password"}).encode()
    assert send(stack.port, "POST", "/auth/register", JSON, creds)[0] == 201
    status, answer = send(stack.port, "POST", "/auth/login", JSON, creds)
    assert status == 200
    assert values(answer, "Cache-Control") == ["no-store"]
    assert values(answer, "X-Content-Type-Options") == ["nosniff"]


def test_the_metrics_port_names_no_version(stack):
    status, answer = send(stack.metrics_port, "GET", "/metrics")
    assert status == 200
    assert values(answer, "Server") == ["flaskapi-metrics"]
    assert values(answer, "X-Content-Type-Options") == ["nosniff"]
    # an answer of the HTTP server itself, before any app runs: a request line it cannot parse
    with socket.create_connection(("127.0.0.1", stack.metrics_port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET /metrics surplus HTTP/1.1\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            part = sock.recv(4096)
            if not part:
                break
            head += part
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.") and " 400 " in lines[0]
    assert [line for line in lines if line.lower().startswith("server:")] == ["Server: flaskapi-metrics"]
