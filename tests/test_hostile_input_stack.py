"""The input rules (docs/api.md, "Input rules") on a real gunicorn, with the exact bytes a
hostile client sends: lone surrogates as JSON escapes (no client library would encode them),
duplicate keys, invisible and control characters, and integers spelt in Unicode digits,
percent-encoded as they go on the wire. Every answer is 4xx in the one error shape, nothing is
written, and no worker logs a traceback. In-process: test_input_rules.py."""

from __future__ import annotations

import http.client
import json
import uuid

import pytest
from sqlalchemy import create_engine, text

from bench.harness.gunicorn import serving

pytestmark = pytest.mark.stack

WORKERS = 2
IO_TIMEOUT = 30.0
ERROR_KEYS = {"status", "code", "message", "details", "request_id", "trace_id"}


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    with serving(migrated_database("test_hostile"), tmp_path_factory.mktemp("hostile"), workers=WORKERS) as stack:
        engine = create_engine(stack.db_uri)

        def rows() -> tuple[int, int]:
            with engine.connect() as conn:
                users = conn.execute(text("SELECT count(*) FROM users")).scalar_one()
                books = conn.execute(text("SELECT count(*) FROM books")).scalar_one()
            return users, books

        stack.rows = rows
        stack.answers = []  # every status this module received, for the no-5xx check
        yield stack
        engine.dispose()


def send(stack, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request with `path` and `body` byte for byte; (status, parsed JSON or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=IO_TIMEOUT)
    try:
        sent = {"X-Request-ID": f"hostile-{uuid.uuid4().hex[:12]}", **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    stack.answers.append((method, path, response.status))
    parsed = json.loads(raw) if raw and response.getheader("Content-Type", "").startswith("application/json") else None
    return response.status, parsed


def assert_refused(answer, status: int, code: str, field: tuple[str, str] | None = None) -> dict:
    """`status` in the one error shape; `field`: (location, name) the details must name."""
    got, body = answer
    assert got == status, body
    assert body is not None and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS and error["status"] == status and error["code"] == code, error
    assert error["request_id"].startswith("hostile-"), error
    if field is not None:
        location, name = field
        assert list(error["details"][location]) == [name], error
    return error


@pytest.fixture(scope="module")
def auth(stack) -> dict:
    email = f"hostile-{uuid.uuid4().hex[:8]}@example.com"
    creds = json.dumps({"email": email, "password": "hostile-password"}).encode()
    assert send(stack, "POST", "/auth/register", creds)[0] == 201
    status, body = send(stack, "POST", "/auth/login", creds)
    assert status == 200
    return {"Authorization": f"Bearer {body['token']}"}


@pytest.fixture(scope="module")
def book_id(stack, auth) -> int:
    status, body = send(stack, "POST", "/books/", b'{"title": "Dune"}', auth)
    assert status == 201
    return body["id"]


# --- bodies -------------------------------------------------------------------------------------

SURROGATE_EMAILS = [rb'"a@ex\ud800ample.com"', rb'"a@ex\udfffample.com"', rb'"a\ud800@example.com"']


@pytest.mark.parametrize("email", SURROGATE_EMAILS)
@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
def test_a_lone_surrogate_in_an_email_is_422(stack, path, email):
    before = stack.rows()
    body = b'{"email": ' + email + b', "password": "secret"}'
    assert_refused(send(stack, "POST", path, body), 422, "validation_error", ("json", "email"))
    assert stack.rows() == before


# JSON escapes, as sent on the wire
HOSTILE_TITLES = [
    rb"\u001b[31mred",
    rb"ring\u0007",
    rb"one\u0085two",
    rb"tab\there",
    rb"abc\u202etxt",
    rb"a\u2066b\u2069",
    rb"Du\u200bne",
    rb"a\u200db",
    rb"\ufeffDune",
    rb"Du\u2060ne",
    rb"Dune\udb40\udc69",  # a tag character (U+E0069), as a surrogate pair
    rb"\ud800",
    rb"   ",
    rb"\u3000",
]


@pytest.mark.parametrize("title", HOSTILE_TITLES)
def test_hostile_text_in_a_book_is_422_naming_the_field(stack, auth, book_id, title):
    before = stack.rows()
    as_title = b'{"title": "' + title + b'"}'
    as_author = b'{"title": "ok", "author": "' + title + b'"}'
    for method, path in (("POST", "/books/"), ("PATCH", f"/books/{book_id}")):
        for body, field in ((as_title, "title"), (as_author, "author")):
            answer = send(stack, method, path, body, auth)
            assert_refused(answer, 422, "validation_error", ("json", field))
    assert stack.rows() == before
    assert send(stack, "GET", f"/books/{book_id}")[1]["title"] == "Dune"


# in the domain: marshmallow's Email validation (IDNA) let these through
@pytest.mark.parametrize("email", [rb"a@exa\u202emple.com", rb"a@exa\u200bmple.com", rb"a@ex\u3000ample.com"])
def test_hostile_text_in_an_email_is_422(stack, email):
    before = stack.rows()
    body = b'{"email": "' + email + b'", "password": "secret"}'
    for path in ("/auth/register", "/auth/login"):
        assert_refused(send(stack, "POST", path, body), 422, "validation_error", ("json", "email"))
    assert stack.rows() == before


def test_emails_that_normalise_alike_are_one_account(stack):
    name = uuid.uuid4().hex[:8]
    first = ('{"email": "\\uff21' + name + '@example.com", "password": "secret"}').encode()  # full-width A
    second = ('{"email": "a' + name + '@EXAMPLE.com", "password": "secret"}').encode()
    status, body = send(stack, "POST", "/auth/register", first)
    assert status == 201 and body["email"] == f"a{name}@example.com"
    before = stack.rows()
    assert_refused(send(stack, "POST", "/auth/register", second), 409, "email_taken")
    assert send(stack, "POST", "/auth/login", second)[0] == 200
    assert stack.rows() == before


DUPLICATES = [
    b'{"title": "first", "title": "second"}',
    b'{"title": "first", "\\u0074itle": "second"}',
    b'{"title": "ok", "author": {"a": 1, "a": 2}}',
    b'{"title": "ok", "author": [{"b": 1, "b": 1}]}',
]


@pytest.mark.parametrize("body", DUPLICATES)
def test_a_duplicate_key_is_400(stack, auth, book_id, body):
    before = stack.rows()
    for method, path in (("POST", "/books/"), ("PUT", f"/books/{book_id}"), ("PATCH", f"/books/{book_id}")):
        error = assert_refused(send(stack, method, path, body, auth), 400, "bad_request")
        assert "duplicate key" in error["message"] and error["details"]["json"]["duplicate_key"], error
    assert stack.rows() == before
    credentials = b'{"email": "dup@example.com", "email": "dup2@example.com", "password": "secret"}'
    assert_refused(send(stack, "POST", "/auth/register", credentials), 400, "bad_request")
    assert stack.rows() == before


# --- paths and queries --------------------------------------------------------------------------


def _digits(number: int, zero: str) -> str:
    """`number` written with the digits that start at `zero`, percent-encoded as UTF-8."""
    spelt = "".join(chr(ord(zero) + int(d)) for d in str(number))
    return "".join(f"%{byte:02X}" for byte in spelt.encode())


def test_a_book_id_not_spelt_canonically_is_404(stack, auth, book_id):
    assert send(stack, "GET", f"/books/{book_id}")[0] == 200
    spellings = [
        _digits(book_id, "\u0660"),  # Arabic-Indic
        _digits(book_id, "\uff10"),  # full-width
        f"000{book_id}",
        f"%2B{book_id}",
        f"%20{book_id}",
        f"{book_id}%20",
    ]
    for spelling in spellings:
        for method in ("GET", "PATCH", "DELETE"):
            body = b'{"title": "changed"}' if method == "PATCH" else None
            assert_refused(send(stack, method, f"/books/{spelling}", body, auth), 404, "not_found")
    assert send(stack, "GET", f"/books/{book_id}")[1]["title"] == "Dune"


@pytest.mark.parametrize("name", ["limit", "cursor"])
def test_a_query_integer_not_spelt_canonically_is_422(stack, book_id, name):
    for value in ("%D9%A5", "%EF%BC%95", "%205", "+5", "5%20", "1e1", "0x10", "5.0", "05"):
        assert_refused(send(stack, "GET", f"/books/?{name}={value}"), 422, "validation_error", ("query", name))
    assert send(stack, "GET", f"/books/?{name}=5")[0] == 200


# --- after everything ---------------------------------------------------------------------------


def test_zz_no_server_error_and_no_traceback(stack):
    """Last in the module (pytest runs a file's tests in order): every answer above was below
    500, and neither gunicorn nor the app logged an error or a traceback."""
    assert len(stack.answers) > 100
    assert [a for a in stack.answers if a[2] >= 500] == []
    logged = "".join(path.read_text() for path in (stack.data_dir / "logs").glob("app.log*"))
    records = [json.loads(line) for line in logged.splitlines()]
    assert len(records) >= len(stack.answers)  # the access lines are there
    assert [r for r in records if r.get("level") in ("ERROR", "CRITICAL") or "exc_info" in r] == []
    assert "Traceback" not in logged
    assert "Traceback" not in (stack.data_dir / "gunicorn.out").read_text()
