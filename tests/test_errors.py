"""Every error leaves in one JSON shape, and a refused request writes nothing."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from flask_jwt_extended import create_access_token
from sqlalchemy import text

from service.extensions import db

ERROR_KEYS = {"status", "code", "message", "details"}


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The one error shape: {"error": {status, code, message, details[, request_id, trace_id]}}."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert ERROR_KEYS <= set(error) <= ERROR_KEYS | {"request_id", "trace_id"}
    assert error["status"] == status
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    if "request_id" in error:
        assert isinstance(error["request_id"], str) and error["request_id"]
    if "trace_id" in error:
        assert re.fullmatch("[0-9a-f]{32}", error["trace_id"]) and int(error["trace_id"], 16)
    if code is not None:
        assert error["code"] == code
    return error


def counts(app) -> tuple[int, int]:
    with app.app_context(), db.engine.connect() as conn:
        users = conn.execute(text("SELECT count(*) FROM users")).scalar_one()
        books = conn.execute(text("SELECT count(*) FROM books")).scalar_one()
    return users, books


@pytest.fixture
def auth(login):
    return login("errors@example.com", "errors-password")


# --- 400 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login", "/books"])
@pytest.mark.parametrize("raw", ['{"title": ', "not json", "{'single': 'quotes'}", "\x00", '{"a": 1}}'])
def test_malformed_json_is_400(app, client, auth, path, raw):
    before = counts(app)
    response = client.post(path, data=raw, content_type="application/json", headers=auth)
    assert_error(response, 400, "bad_request")
    assert counts(app) == before


def test_malformed_json_on_update_is_400(app, client, auth):
    book = client.post("/books", json={"title": "Keep"}, headers=auth).get_json()
    response = client.put(f"/books/{book['id']}", data="{", content_type="application/json", headers=auth)
    assert_error(response, 400, "bad_request")
    assert client.get(f"/books/{book['id']}").get_json()["title"] == "Keep"


# --- 401 -----------------------------------------------------------------------------------


def test_missing_token_is_401(app, client):
    response = client.post("/books", json={"title": "No token"})
    assert_error(response, 401, "token_missing")
    assert counts(app) == (0, 0)


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer ", "Token abc", "Bearer not.a.jwt", "Bearer abc", "Basic dXNlcjpwYXNz"]
)
def test_malformed_authorization_is_401(app, client, header):
    response = client.post("/books", json={"title": "Bad header"}, headers={"Authorization": header})
    error = assert_error(response, 401)
    assert error["code"] in ("token_missing", "token_invalid")
    assert counts(app) == (0, 0)


def test_token_signed_with_another_key_is_401(app, client, make_app):
    other = make_app(JWT_SECRET_KEY="a-completely-different-signing-key-0123456789")
    other_client = other.test_client()
    credentials = {"email": "forger@example.com", "password": "forger-password"}
    assert other_client.post("/auth/register", json=credentials).status_code == 201
    forged = other_client.post("/auth/login", json=credentials).get_json()["token"]
    assert (
        other_client.post(
            "/books", json={"title": "ok there"}, headers={"Authorization": f"Bearer {forged}"}
        ).status_code
        == 201
    )
    _, books_before = counts(app)

    response = client.post("/books", json={"title": "Forged"}, headers={"Authorization": f"Bearer {forged}"})
    assert_error(response, 401, "token_invalid")
    assert counts(app)[1] == books_before


def test_expired_token_is_401(app, client, login):
    login("late@example.com", "late-password")
    with app.app_context():
        with db.engine.connect() as conn:
            user_id = conn.execute(text("SELECT id FROM users")).scalar_one()
        expired = create_access_token(identity=str(user_id), expires_delta=timedelta(seconds=-30))
    response = client.post("/books", json={"title": "Too late"}, headers={"Authorization": f"Bearer {expired}"})
    assert_error(response, 401, "token_expired")
    assert counts(app) == (1, 0)


def test_token_of_deleted_user_is_401_not_500(app, client, login):
    headers = login("ghost@example.com", "ghost-password")
    assert client.post("/books", json={"title": "Before"}, headers=headers).status_code == 201
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text("DELETE FROM users WHERE email = 'ghost@example.com'"))
    assert counts(app) == (0, 0)  # ON DELETE CASCADE took the book
    response = client.post("/books", json={"title": "After"}, headers=headers)
    assert_error(response, 401, "token_invalid")
    assert counts(app) == (0, 0)


@pytest.mark.parametrize("identity", ["not-a-number", "", "1.5"])
def test_token_with_non_numeric_identity_is_401(app, client, identity):
    with app.app_context():
        token = create_access_token(identity=identity)
    response = client.post("/books", json={"title": "Odd"}, headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 401, "token_invalid")
    assert counts(app) == (0, 0)


def test_bad_credentials_shape(client):
    response = client.post("/auth/login", json={"email": "nobody@example.com", "password": "whatever"})
    assert_error(response, 401, "bad_credentials")


# --- 403 / 404 / 405 / 409 -----------------------------------------------------------------


def test_forbidden_shape(app, client, login):
    owner = login("owner@example.com", "owner-password")
    other = login("other@example.com", "other-password")
    book = client.post("/books", json={"title": "Mine"}, headers=owner).get_json()
    response = client.put(f"/books/{book['id']}", json={"title": "Yours"}, headers=other)
    assert_error(response, 403, "not_owner")


@pytest.mark.parametrize("path", ["/nope", "/books/12345", "/books/abc", "/auth", "/books/1/extra"])
def test_not_found_shape(client, path):
    assert_error(client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("DELETE", "/books/", {"GET", "POST"}),
        ("PUT", "/books/", {"GET", "POST"}),
        ("GET", "/auth/login", {"POST"}),
        ("GET", "/auth/register", {"POST"}),
        ("POST", "/books/1", {"GET", "PUT", "PATCH", "DELETE"}),
    ],
)
def test_method_not_allowed_shape_and_allow_header(client, method, path, allowed):
    response = client.open(path, method=method, json={"title": "x"})
    error = assert_error(response, 405, "method_not_allowed")
    assert method in error["message"]
    allow = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= allow
    assert method not in allow


def test_conflict_shape(client):
    credentials = {"email": "twice@example.com", "password": "twice-password"}
    client.post("/auth/register", json=credentials)
    assert_error(client.post("/auth/register", json=credentials), 409, "email_taken")


# --- 413 / 415 / 422 -----------------------------------------------------------------------


def test_body_too_large_is_413(app, client, auth):
    limit = app.config["MAX_CONTENT_LENGTH"]
    assert limit == 64 * 1024
    raw = '{"title": "' + "x" * limit + '"}'
    before = counts(app)
    response = client.post("/books", data=raw, content_type="application/json", headers=auth)
    error = assert_error(response, 413, "payload_too_large")
    assert str(limit) in error["message"]
    response = client.post("/auth/register", data=raw, content_type="application/json")
    assert_error(response, 413, "payload_too_large")
    assert counts(app) == before


def test_body_limit_follows_setting(make_app):
    client = make_app(MAX_CONTENT_LENGTH="2048").test_client()
    big = {"email": "big@example.com", "password": "p" * 3000}
    assert_error(client.post("/auth/register", json=big), 413, "payload_too_large")
    small = {"email": "small@example.com", "password": "p" * 100}
    assert client.post("/auth/register", json=small).status_code == 201


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": '{"title": "plain"}', "content_type": "text/plain"},
        {"data": {"title": "form"}},  # application/x-www-form-urlencoded
        {
            "data": {"title": "multipart", "file": (__import__("io").BytesIO(b"x"), "f.txt")},
            "content_type": "multipart/form-data",
        },
        {"data": b'{"title": "no type"}'},
    ],
)
def test_non_json_body_is_415_and_writes_nothing(app, client, auth, kwargs):
    response = client.post("/books", headers=auth, **kwargs)
    assert_error(response, 415, "unsupported_media_type")
    assert counts(app) == (1, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": "email=a%40b.com&password=secret123", "content_type": "application/x-www-form-urlencoded"},
        {"data": '{"email": "a@b.com", "password": "secret123"}', "content_type": "text/plain"},
    ],
)
def test_non_json_register_is_415_and_writes_nothing(app, client, kwargs):
    response = client.post("/auth/register", **kwargs)
    assert_error(response, 415, "unsupported_media_type")
    assert counts(app) == (0, 0)


@pytest.mark.parametrize("raw", ["{}", "[]", '"title"', "42", "null", "true", '{"title": ["list"]}'])
def test_wrong_json_type_is_422_and_writes_nothing(app, client, auth, raw):
    response = client.post("/books", data=raw, content_type="application/json", headers=auth)
    error = assert_error(response, 422, "validation_error")
    assert error["details"]
    assert counts(app) == (1, 0)


def test_validation_error_details_name_the_field(client):
    response = client.post("/auth/register", json={"email": "bad", "password": "x"})
    error = assert_error(response, 422, "validation_error")
    assert set(error["details"]["json"]) == {"email", "password"}


def test_query_validation_error_shape(client):
    error = assert_error(client.get("/books?limit=0"), 422, "validation_error")
    assert "limit" in error["details"]["query"]


# --- 500 -----------------------------------------------------------------------------------


def test_unexpected_exception_is_500_without_leaking(make_app):
    app = make_app()

    @app.get("/__boom")
    def boom():
        raise RuntimeError("secret internals: password=hunter2 at db-host-17")

    response = app.test_client().get("/__boom")
    assert_error(response, 500, "internal_error")
    raw = response.get_data(as_text=True)
    assert "hunter2" not in raw
    assert "secret internals" not in raw
    assert "RuntimeError" not in raw
    assert "Traceback" not in raw
    assert response.headers["X-Content-Type-Options"] == "nosniff"  # the 500 too
    assert "Cache-Control" not in response.headers
    with_token = app.test_client().get("/__boom", headers={"Authorization": "Bearer x"})
    assert with_token.headers.getlist("Cache-Control") == ["no-store"]


def test_unexpected_exception_in_post_writes_nothing(make_app):
    app = make_app()

    @app.post("/__boom")
    def boom():
        raise KeyError("missing")

    client = app.test_client()
    assert_error(client.post("/__boom", json={"a": 1}), 500, "internal_error")
    assert counts(app) == (0, 0)
    # the app keeps serving after the failure
    assert client.get("/books").status_code == 200


# --- bad input writes nothing --------------------------------------------------------------


def test_sequence_of_bad_posts_writes_nothing(app, client, auth):
    assert counts(app) == (1, 0)
    bad_requests = [
        ("/auth/register", {"data": "{", "content_type": "application/json"}),
        ("/auth/register", {"json": {"email": "x@y.z"}}),
        ("/auth/register", {"json": {"email": "new@example.com", "password": "\ud800ok-long"}}),
        ("/auth/register", {"data": "email=x", "content_type": "application/x-www-form-urlencoded"}),
        ("/auth/register", {"json": {"email": "errors@example.com", "password": "errors-password"}}),
        ("/books", {"json": {"title": ""}, "headers": auth}),
        ("/books", {"json": {"title": "ok"}}),
        ("/books", {"data": '{"title": "\\ud800"}', "content_type": "application/json", "headers": auth}),
        ("/books", {"json": {"title": "ok", "owner_id": 2}, "headers": auth}),
        ("/books", {"data": "title=ok", "content_type": "application/x-www-form-urlencoded", "headers": auth}),
    ]
    for path, kwargs in bad_requests:
        response = client.post(path, **kwargs)
        assert 400 <= response.status_code < 500, (path, kwargs, response.status_code)
        assert_error(response, response.status_code)
        assert counts(app) == (1, 0), (path, kwargs)
