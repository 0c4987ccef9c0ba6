"""What a client sends cannot grow the metrics or slip past the body limit: a real gunicorn with
three workers, talked to directly (raw sockets, http.client), as a client without nginx would."""

from __future__ import annotations

import http.client
import json
import random
import socket
import string
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
from sqlalchemy import create_engine, text

from bench.harness.gunicorn import serving
from bench.harness.polling import wait_for
from bench.harness.scrape import scrape
from service import create_app
from tests.conftest import TEST_SECRET

pytestmark = pytest.mark.stack

WORKERS = 3
LIMIT = 64 * 1024  # MAX_CONTENT_LENGTH's default
SERVED_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
IO_TIMEOUT = 30.0  # per socket operation: a hang fails the test instead of blocking it


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    with serving(migrated_database("test_bounds"), tmp_path_factory.mktemp("bounds"), workers=WORKERS) as stack:
        yield stack


@pytest.fixture(scope="module")
def auth(stack) -> str:
    """An Authorization header value for a fresh user."""
    creds = {"email": f"bounds-{uuid.uuid4().hex[:8]}@example.com", "password": "bounds-password"}
    assert requests.post(stack.url + "/auth/register", json=creds, timeout=10).status_code == 201
    token = requests.post(stack.url + "/auth/login", json=creds, timeout=10).json()["token"]
    return f"Bearer {token}"


@pytest.fixture(scope="module")
def books_count(stack):
    engine = create_engine(stack.db_uri)

    def count() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM books")).scalar_one()

    yield count
    engine.dispose()


# --- raw HTTP ----------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request over its own connection: the answer the client could read, if any, and what
    the sending side ran into."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    read_error: str | None = None
    send_error: str | None = None
    seconds: float = 0.0

    def json(self) -> dict:
        return json.loads(self.body)


def exchange(port: int, head: str, body_parts) -> Exchange:
    """Send `head` and then every part of `body_parts` from a thread while this one reads the
    answer, as a client that streams its upload does: a server that answers before reading
    the body is seen answering (or resetting), never waited on forever."""
    result = Exchange()
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)

    def send() -> None:
        try:
            sock.sendall(head.encode("latin-1"))
            for part in body_parts:
                sock.sendall(part)
        except OSError as exc:
            result.send_error = repr(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock, method=head.split(" ", 1)[0])
        response.begin()
        result.status = response.status
        result.headers = {k.lower(): v for k, v in response.getheaders()}
        result.body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        result.read_error = repr(exc)
    sender.join(IO_TIMEOUT)
    assert not sender.is_alive(), "the upload was still blocked after the answer"
    sock.close()
    result.seconds = time.monotonic() - started
    return result


def post_head(path: str, auth: str, *, length: int | None = None) -> str:
    """Request line and headers of a JSON POST: with Content-Length, or chunked without it."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth}\r\nX-Request-ID: bounds-{uuid.uuid4().hex[:12]}\r\n{framing}\r\n\r\n"
    )


def chunked(data: bytes, size: int = 16 * 1024):
    """`data` in HTTP/1.1 chunks, then the last chunk."""
    for start in range(0, len(data), size):
        piece = data[start : start + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def assert_413(result: Exchange) -> dict:
    assert result.status == 413, result
    error = result.json()["error"]
    assert error["status"] == 413 and error["code"] == "payload_too_large", error
    assert error["request_id"] and result.headers["x-request-id"] == error["request_id"]
    return error


# --- bodies -------------------------------------------------------------------------------------


def test_an_oversized_body_with_content_length_gets_a_readable_413(stack, auth, books_count):
    size = 5 * 1024 * 1024
    before = books_count()
    result = exchange(stack.port, post_head("/books/", auth, length=size), [b"x" * size])
    assert result.send_error is None, result  # the whole body was taken, not reset
    assert_413(result)
    assert books_count() == before


def test_a_body_beyond_the_drain_bound_is_refused_without_a_hang(stack, auth, books_count):
    size = 12 * 1024 * 1024
    before = books_count()
    result = exchange(stack.port, post_head("/books/", auth, length=size), [b"x" * (1024 * 1024)] * 12)
    # Beyond MAX_DRAIN_BYTES the server answers 413 and closes: the client reads the answer or
    # its connection is reset, within the timeouts either way.
    assert result.seconds < IO_TIMEOUT, result
    if result.status is not None:
        assert_413(result)
    else:
        assert result.read_error, result
    assert books_count() == before
    assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200


def test_a_chunked_body_beyond_the_limit_is_413_not_truncated(stack, auth, books_count):
    """The first MAX_CONTENT_LENGTH bytes are a valid book; what follows is garbage. Parsing the
    first part alone would store a book the client never sent whole."""
    valid = b'{"title": "truncated"}'
    body = valid + b" " * (LIMIT - len(valid)) + b"garbage" * 1000
    before = books_count()
    result = exchange(stack.port, post_head("/books/", auth), chunked(body))
    assert result.send_error is None, result
    assert_413(result)
    assert books_count() == before


def test_a_chunked_body_far_beyond_the_limit_is_413(stack, auth, books_count):
    before = books_count()
    result = exchange(stack.port, post_head("/books/", auth), chunked(b"x" * (3 * 1024 * 1024), size=64 * 1024))
    assert result.send_error is None, result
    assert_413(result)
    assert books_count() == before


def test_a_chunked_body_within_the_limit_is_served(stack, auth, books_count):
    title = f"chunked {uuid.uuid4().hex[:8]}"
    before = books_count()
    result = exchange(stack.port, post_head("/books/", auth), chunked(json.dumps({"title": title}).encode(), size=5))
    assert result.status == 201, result
    assert result.json()["title"] == title
    assert books_count() == before + 1


def test_a_body_at_the_limit_with_content_length_is_served(stack, auth, books_count):
    title = f"at the limit {uuid.uuid4().hex[:8]}"
    raw = json.dumps({"title": title}).encode()
    body = raw + b" " * (LIMIT - len(raw))
    before = books_count()
    result = exchange(stack.port, post_head("/books/", auth, length=len(body)), [body])
    assert result.status == 201, result
    assert result.json()["title"] == title
    assert books_count() == before + 1
    one_more = exchange(stack.port, post_head("/books/", auth, length=len(body) + 1), [body + b" "])
    assert_413(one_more)
    assert books_count() == before + 1


def test_the_connection_stays_usable_after_a_drained_413(stack, auth):
    """A 413 whose body was read whole leaves the connection at a request boundary."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=IO_TIMEOUT)
    headers = {"Content-Type": "application/json", "Authorization": auth}
    conn.request("POST", "/books/", body=b"x" * (LIMIT * 4), headers=headers)
    first = conn.getresponse()
    assert first.status == 413
    first.read()
    conn.request("GET", "/healthz")
    second = conn.getresponse()
    assert second.status == 200
    second.read()
    conn.close()


# --- labels -------------------------------------------------------------------------------------


def _routes() -> set[str]:
    """The route templates of the service (an app that never connects to its database)."""
    app = create_app(
        {
            "FLASK_ENV": "testing",
            "JWT_SECRET_KEY": TEST_SECRET,
            "DB_URI": "postgresql+psycopg2://routes-only@127.0.0.1:9/unused",
            "DATA_DIR": tempfile.gettempdir(),
        }
    )
    return {rule.rule for rule in app.url_map.iter_rules()}


def hostile_requests(n: int, seed: int = 13) -> list[tuple[str, str]]:
    """(method, path) pairs a hostile client might send: method tokens the API does not serve
    (uppercase, lowercase, mixed, some too short or long for gunicorn) on random ids, junk
    paths and percent-encoded junk."""
    rng = random.Random(seed)
    token_chars = string.ascii_uppercase + string.digits + "!$%&'*+-.^_`|~"

    def method() -> str:
        kind = rng.random()
        length = rng.randint(3, 20) if rng.random() < 0.9 else rng.choice([1, 2, 21, 30])
        token = "".join(rng.choice(token_chars) for _ in range(length))
        if kind < 0.15:
            token = token.lower()
        elif kind < 0.3:
            token = "".join(c.lower() if rng.random() < 0.5 else c for c in token)
        return token

    def path() -> str:
        kind = rng.randrange(5)
        if kind == 0:
            return f"/books/{rng.randrange(10**20)}"
        if kind == 1:
            return "/" + "".join(rng.choice(string.ascii_letters + string.digits + "-_.~") for _ in range(12))
        if kind == 2:
            return "/books/" + "".join(f"%{rng.randrange(256):02X}" for _ in range(rng.randint(1, 12)))
        if kind == 3:
            return f"/auth/{uuid.UUID(int=rng.getrandbits(128)).hex}?q={rng.randrange(10**9)}"
        return "/" + "/".join(uuid.UUID(int=rng.getrandbits(128)).hex[:6] for _ in range(rng.randint(1, 4)))

    pairs = []
    while len(pairs) < n:
        m = method()
        if m not in SERVED_METHODS:
            pairs.append((m, path()))
    return pairs


def _send(port: int, method: str, path: str) -> int | str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


def series(url: str) -> tuple[set[tuple[str, tuple]], int]:
    """Every series the scrape reports, and the scrape's size in bytes."""
    size = len(requests.get(url, timeout=10).content)
    return {(name, tuple(sorted(labels.items()))) for name, labels, _ in scrape(url)}, size


def test_hostile_methods_and_paths_add_no_series(stack):
    routes = _routes()
    # warm up: the label combinations of ordinary traffic exist before the count
    for path in ("/books/1", "/nope"):
        requests.get(stack.url + path, timeout=10)
    before, size_before = series(stack.metrics_url)

    pairs = hostile_requests(1000)
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda pair: _send(stack.port, *pair), pairs))
    after, size_after = series(stack.metrics_url)

    new = sorted(after - before)
    grown = f"{len(new)} new series, scrape {size_before} -> {size_after} bytes, e.g. {new[:20]}"
    assert len(new) <= 10, grown
    assert size_after <= size_before * 1.05 + 4096, grown
    unanswered = [(pair, a) for pair, a in zip(pairs, answers, strict=True) if not isinstance(a, int)]
    assert unanswered == []
    server_errors = [(pair, a) for pair, a in zip(pairs, answers, strict=True) if a >= 500]
    assert server_errors == []
    assert set(answers) <= {400, 405}, sorted(set(answers))

    for name, labels in after:
        values = dict(labels)
        if "method" in values:
            assert values["method"] in SERVED_METHODS | {"other"}, (name, values)
        if "route" in values:
            assert values["route"] in routes | {"<unmatched>"}, (name, values)
        if "status" in values:
            assert values["status"].isdigit() and 100 <= int(values["status"]) <= 599, (name, values)


def test_an_unknown_method_is_405_in_the_error_shape_and_logged(stack):
    request_id = f"bounds-{uuid.uuid4().hex[:12]}"
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=IO_TIMEOUT)
    conn.request("CARD001", "/books/1", headers={"X-Request-ID": request_id})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 405
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("X-Request-ID") == request_id
    allow = {m.strip() for m in response.getheader("Allow").split(",")}
    assert allow == {"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"}
    assert body["error"]["code"] == "method_not_allowed" and body["error"]["request_id"] == request_id

    def logged():
        for path in (stack.data_dir / "logs").glob("app.log*"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("request_id") == request_id:
                    return record
        return None

    record = wait_for(logged, "the access line of the refused request")
    assert record["event"] == "access"
    assert (record["method"], record["path"], record["status"], record["route"]) == ("CARD001", "/books/1", 405, None)
