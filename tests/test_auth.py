"""Registration and login against the real database: status codes, bodies, what is stored."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from service.auth.passwords import Passwords
from service.extensions import db


def users_rows(app) -> list[dict]:
    with app.app_context(), db.engine.connect() as conn:
        return [
            dict(r) for r in conn.execute(text("SELECT id, email, password_hash FROM users ORDER BY id")).mappings()
        ]


def register(client, email="reader@example.com", password="secret"):
    return client.post("/auth/register", json={"email": email, "password": password})


def login_response(client, email="reader@example.com", password="secret"):
    return client.post("/auth/login", json={"email": email, "password": password})


# --- register ------------------------------------------------------------------------------


def test_register_returns_201_with_public_fields_only(app, client):
    response = register(client)
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"id", "email", "created_at"}
    assert isinstance(body["id"], int) and body["id"] >= 1
    assert body["email"] == "reader@example.com"
    assert body["created_at"]
    raw = response.get_data(as_text=True)
    assert "secret" not in raw
    assert "argon2" not in raw
    assert [r["id"] for r in users_rows(app)] == [body["id"]]


def test_register_normalises_email(app, client):
    response = register(client, email="  A@Test.COM ")
    assert response.status_code == 201
    assert response.get_json()["email"] == "a@test.com"
    assert [r["email"] for r in users_rows(app)] == ["a@test.com"]
    # and the normalised spelling logs in with any casing
    assert login_response(client, email="A@TEST.com").status_code == 200


def test_register_duplicate_is_409(app, client):
    assert register(client).status_code == 201
    response = register(client, password="another-password")
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["status"] == 409
    assert error["code"] == "email_taken"
    assert len(users_rows(app)) == 1


def test_register_duplicate_with_different_case_is_409(app, client):
    assert register(client, email="reader@example.com").status_code == 201
    response = register(client, email=" Reader@EXAMPLE.com")
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "email_taken"
    assert len(users_rows(app)) == 1


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"email": "not-an-email", "password": "secret"}, "email"),
        ({"email": "", "password": "secret"}, "email"),
        ({"email": "a" * 250 + "@x.io", "password": "secret"}, "email"),
        ({"email": 5, "password": "secret"}, "email"),
        ({"email": "reader@example.com", "password": "12345"}, "password"),
        ({"email": "reader@example.com", "password": "x" * 129}, "password"),
        ({"email": "reader@example.com", "password": "secret\x00"}, "password"),
        ({"email": "reader@example.com", "password": "secret", "is_admin": True}, "is_admin"),
        ({"password": "secret"}, "email"),
        ({"email": "reader@example.com"}, "password"),
    ],
)
def test_register_invalid_input_is_422_and_writes_nothing(app, client, payload, field):
    response = client.post("/auth/register", json=payload)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]["json"]
    assert users_rows(app) == []


def test_register_missing_body_is_422(app, client):
    response = client.post("/auth/register", json={})
    assert response.status_code == 422
    assert set(response.get_json()["error"]["details"]["json"]) == {"email", "password"}
    assert users_rows(app) == []


def test_password_length_bounds_are_inclusive(client):
    assert register(client, email="six@example.com", password="x" * 6).status_code == 201
    assert register(client, email="max@example.com", password="y" * 128).status_code == 201
    assert login_response(client, email="max@example.com", password="y" * 128).status_code == 200


# --- login ---------------------------------------------------------------------------------


def test_login_returns_token(app, client):
    register(client)
    response = login_response(client)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["token"].count(".") == 2


def test_login_expires_in_follows_setting(make_app):
    client = make_app(JWT_ACCESS_TOKEN_EXPIRES="120").test_client()
    register(client)
    assert login_response(client).get_json()["expires_in"] == 120


def test_wrong_password_and_unknown_email_get_identical_401(client):
    register(client)
    wrong = login_response(client, password="not-the-password")
    unknown = login_response(client, email="nobody@example.com")
    assert wrong.status_code == unknown.status_code == 401
    wrong_error = wrong.get_json()["error"]
    unknown_error = unknown.get_json()["error"]
    for per_request in ("request_id", "trace_id"):  # each request's own ids
        wrong_error.pop(per_request, None)
        unknown_error.pop(per_request, None)
    assert wrong_error == unknown_error
    assert wrong_error["code"] == "bad_credentials"
    assert wrong_error["message"] == "Wrong email or password"
    assert wrong.headers.get("WWW-Authenticate") == unknown.headers.get("WWW-Authenticate")


def test_login_invalid_input_is_422(client):
    response = client.post("/auth/login", json={"email": "reader@example.com"})
    assert response.status_code == 422
    assert "password" in response.get_json()["error"]["details"]["json"]


def test_token_works_on_protected_route(client, login):
    headers = login()
    response = client.post("/books", json={"title": "Dune"}, headers=headers)
    assert response.status_code == 201
    assert response.get_json()["title"] == "Dune"


def test_token_identity_is_the_user(app, client):
    user_id = register(client).get_json()["id"]
    token = login_response(client).get_json()["token"]
    response = client.post("/books", json={"title": "Mine"}, headers={"Authorization": f"Bearer {token}"})
    assert response.get_json()["owner_id"] == user_id


# --- what is stored ------------------------------------------------------------------------


def test_password_is_stored_as_argon2id_hash(app, client):
    register(client, password="correct horse")
    [row] = users_rows(app)
    stored = row["password_hash"]
    assert stored.startswith("$argon2id$v=19$")
    assert "correct horse" not in stored
    # the hash carries the configured (test) cost
    assert "m=1024,t=1,p=1" in stored
    assert Passwords(time_cost=1, memory_cost=1024, parallelism=1).verify(stored, "correct horse")


def test_login_rehashes_when_cost_was_raised(make_app):
    app_a = make_app(PASSWORD_HASH_TIME_COST="1")
    client_a = app_a.test_client()
    assert register(client_a, password="rehash-me").status_code == 201
    [before] = users_rows(app_a)
    assert ",t=1," in before["password_hash"]

    app_b = make_app(PASSWORD_HASH_TIME_COST="3")
    client_b = app_b.test_client()
    assert login_response(client_b, password="rehash-me").status_code == 200
    [after] = users_rows(app_b)
    assert after["id"] == before["id"]
    assert after["password_hash"] != before["password_hash"]
    assert after["password_hash"].startswith("$argon2id$")
    assert ",t=3," in after["password_hash"]
    # the new hash still accepts the password, in both apps
    assert login_response(client_b, password="rehash-me").status_code == 200
    assert login_response(client_a, password="rehash-me").status_code == 200


def test_login_does_not_rehash_at_same_cost(app, client):
    register(client)
    [before] = users_rows(app)
    assert login_response(client).status_code == 200
    [after] = users_rows(app)
    assert after["password_hash"] == before["password_hash"]


def test_wrong_password_does_not_rehash(make_app):
    client_a = make_app(PASSWORD_HASH_TIME_COST="1").test_client()
    register(client_a)
    app_b = make_app(PASSWORD_HASH_TIME_COST="2")
    [before] = users_rows(app_b)
    assert login_response(app_b.test_client(), password="wrong-password").status_code == 401
    [after] = users_rows(app_b)
    assert after["password_hash"] == before["password_hash"]


# --- no database connection held while hashing ---------------------------------------------


@pytest.fixture
def pool_observer(monkeypatch):
    """Wrap Passwords.hash/verify to record how many pool connections are checked out at the
    moment the CPU-bound work runs. Behaviour is unchanged: the originals are called."""
    seen: dict[str, list[int]] = {"hash": [], "verify": []}
    original_hash = Passwords.hash
    original_verify = Passwords.verify

    def observed_hash(self, password):
        seen["hash"].append(db.engine.pool.checkedout())
        return original_hash(self, password)

    def observed_verify(self, password_hash, password):
        seen["verify"].append(db.engine.pool.checkedout())
        return original_verify(self, password_hash, password)

    monkeypatch.setattr(Passwords, "hash", observed_hash)
    monkeypatch.setattr(Passwords, "verify", observed_verify)
    return seen


def test_no_connection_is_held_while_hashing_or_verifying(make_app, pool_observer):
    app = make_app(DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0", DB_POOL_TIMEOUT="1")
    client = app.test_client()
    assert register(client).status_code == 201
    assert login_response(client).status_code == 200
    assert login_response(client, password="wrong-password").status_code == 401
    assert login_response(client, email="nobody@example.com").status_code == 401
    assert pool_observer["hash"] == [0]
    assert pool_observer["verify"] == [0, 0, 0]


def test_no_connection_is_held_while_rehashing(make_app, pool_observer):
    register(make_app(PASSWORD_HASH_TIME_COST="1").test_client())
    app = make_app(PASSWORD_HASH_TIME_COST="2", DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0")
    assert login_response(app.test_client()).status_code == 200
    # one hash at registration, one rehash at login: neither with a connection checked out
    assert pool_observer["hash"] == [0, 0]
    assert pool_observer["verify"] == [0]
    with app.app_context():
        assert db.engine.pool.checkedout() == 0


def test_single_connection_pool_serves_register_login_and_books(make_app):
    app = make_app(DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0", DB_POOL_TIMEOUT="1")
    client = app.test_client()
    for i in range(3):
        assert register(client, email=f"u{i}@example.com").status_code == 201
        token = login_response(client, email=f"u{i}@example.com").get_json()["token"]
        response = client.post("/books", json={"title": f"Book {i}"}, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 201
    assert len(client.get("/books").get_json()["items"]) == 3
    with app.app_context():
        assert db.engine.pool.checkedout() == 0
