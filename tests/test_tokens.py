"""The token claim policy (service/auth/tokens.py), in-process: tokens signed with the app's own
key that break one rule each are refused with 401 `token_invalid` before any database work, and
the tokens the service issues carry every claim the policy checks."""

from __future__ import annotations

import json
import logging
import time

import jwt
import pytest
from sqlalchemy import text

from service.auth.tokens import subject_id
from service.extensions import db
from service.models import MAX_ID
from tests.conftest import TEST_SECRET
from tests.test_errors import assert_error, counts

LIFETIME = 3600  # JWT_ACCESS_TOKEN_EXPIRES's default, which the test apps keep
ISSUER = "flaskapi-observability"  # JWT_ISSUER's default
AUDIENCE = "flaskapi-observability-api"  # JWT_AUDIENCE's default


def forge(sub="1", *, drop=(), key=TEST_SECRET, algorithm="HS256", headers=None, **claims) -> str:
    """A token with exactly the claims the policy needs, signed with the app's real key; `drop`
    removes claims, keywords replace or add them."""
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE}
    payload.update(claims)
    for name in drop:
        payload.pop(name)
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def user_id(app, login) -> int:
    login("claims@example.com", "claims-password")
    with app.app_context(), db.engine.connect() as conn:
        return conn.execute(text("SELECT id FROM users WHERE email = 'claims@example.com'")).scalar_one()


def test_a_forged_token_with_every_required_claim_is_accepted(client, user_id):
    """The positive control: what the refusals below change is the one rule each breaks."""
    response = client.post("/books", json={"title": "Mine"}, headers=bearer(forge(str(user_id))))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["owner_id"] == user_id


def test_issued_tokens_carry_the_claims_the_policy_checks(app, client, user_id):
    token = client.post("/auth/login", json={"email": "claims@example.com", "password": "claims-password"})
    claims = jwt.decode(token.get_json()["token"], TEST_SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["sub"] == str(user_id)
    assert claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == LIFETIME
    assert jwt.get_unverified_header(token.get_json()["token"])["alg"] == "HS256"


@pytest.mark.parametrize(
    "case",
    [
        {"drop": ("exp",)},  # valid forever
        {"drop": ("iat",)},
        {"drop": ("sub",)},
        {"drop": ("iss",)},
        {"drop": ("aud",)},
        {"iss": "someone-else"},
        {"aud": "another-service"},
        {"aud": []},
        {"iss": AUDIENCE, "aud": ISSUER},  # swapped
        {"exp": "9999999999"},  # PyJWT would read a numeric string as a time
        {"iat": "0"},
        {"exp": True},
        {"exp": 1.5e10},
        {"iat": int(time.time()) + 3600},  # issued in the future
        {"exp": int(time.time()) + 10 * LIFETIME},  # lives longer than the service issues
        {"nbf": int(time.time()) + 3600},
        {"algorithm": "HS512"},
        {"key": "another-key-" + "x" * 40},
    ],
    ids=lambda case: ",".join(f"{k}={v!r}" for k, v in case.items())[:60],
)
def test_a_token_breaking_one_rule_is_401_token_invalid(app, client, user_id, case):
    case = dict(case)
    token = forge(str(user_id), **case)
    before = counts(app)
    response = client.post("/books", json={"title": "Forged"}, headers=bearer(token))
    assert_error(response, 401, "token_invalid")
    assert counts(app) == before


def test_an_unsigned_token_is_401_token_invalid(app, client, user_id):
    token = jwt.encode(
        {"sub": str(user_id), "iat": int(time.time()), "exp": int(time.time()) + 60}, None, algorithm="none"
    )
    assert_error(client.post("/books", json={"title": "x"}, headers=bearer(token)), 401, "token_invalid")


@pytest.mark.parametrize(
    "sub",
    [
        " 1",
        "1 ",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: int() reads it as 1
        "\uff11",  # FULLWIDTH DIGIT ONE
        "1_0",  # int() reads it as 10
        "+1",
        "-1",
        "0",
        "01",
        "1\n",
        "1.0",
        "1e3",
        "0x1",
        "",
        "9" * 30,
        "9" * 19,  # 19 digits, above bigint
        str(MAX_ID + 1),
        1,  # a number, not a string
        None,
        ["1"],
    ],
    ids=repr,
)
def test_a_subject_that_is_not_a_canonical_user_id_is_401_token_invalid(app, client, user_id, sub):
    """`sub` is a canonical decimal user id (no sign, no leading zero, ASCII digits only, within
    bigint), checked before any database work: " 1", "\u0661" and "1_0" were users 1, 1 and 10."""
    before = counts(app)
    response = client.post("/books", json={"title": "Forged"}, headers=bearer(forge(sub)))
    assert_error(response, 401, "token_invalid")
    assert counts(app) == before


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_every_protected_route_applies_the_policy(app, client, login, method):
    headers = login("owner@example.com", "owner-password")
    book = client.post("/books", json={"title": "Keep"}, headers=headers).get_json()
    response = getattr(client, method)(f"/books/{book['id']}", json={"title": "Changed"}, headers=bearer(forge(" 1")))
    assert_error(response, 401, "token_invalid")
    assert client.get(f"/books/{book['id']}").get_json()["title"] == "Keep"


def test_the_largest_user_id_is_a_valid_subject_and_an_unknown_user_is_401(app, client):
    assert subject_id(str(MAX_ID)) == MAX_ID
    response = client.post("/books", json={"title": "Nobody"}, headers=bearer(forge(str(MAX_ID))))
    assert_error(response, 401, "token_invalid")
    assert counts(app) == (0, 0)


def test_an_oversized_subject_never_reaches_the_database(make_app, tmp_path):
    """Thirty 9s was a 500 whose ERROR line held the SQL and its parameters: now no statement is
    sent at all, and the request logs only its access line."""
    app = make_app(LOG_DIR=str(tmp_path / "logs"), LOG_CONSOLE="0")
    statements = []
    with app.app_context():
        from sqlalchemy import event

        event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    client = app.test_client()
    response = client.post("/books", json={"title": "Big"}, headers=bearer(forge("9" * 30)) | {"X-Request-ID": "big-1"})
    assert_error(response, 401, "token_invalid")
    assert statements == []
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = [json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines()]
    mine = [line for line in lines if line.get("request_id") == "big-1"]
    assert [(line["event"], line["status"], line["level"]) for line in mine] == [("access", 401, "INFO")]
    assert "9" * 30 not in (tmp_path / "logs" / "app.log").read_text()


def test_issuer_and_audience_follow_their_settings(make_app):
    app = make_app(JWT_ISSUER="books-auth.example", JWT_AUDIENCE="books-api.example")
    client = app.test_client()
    client.post("/auth/register", json={"email": "iss@example.com", "password": "iss-password"})
    token = client.post("/auth/login", json={"email": "iss@example.com", "password": "iss-password"}).get_json()
    claims = jwt.decode(token["token"], TEST_SECRET, algorithms=["HS256"], audience="books-api.example")
    assert (claims["iss"], claims["aud"]) == ("books-auth.example", "books-api.example")
    assert client.post("/books", json={"title": "Ok"}, headers=bearer(token["token"])).status_code == 201
    # a token for the defaults (another deployment sharing the key) is not one of this one's
    default = forge(claims["sub"])
    assert_error(client.post("/books", json={"title": "x"}, headers=bearer(default)), 401, "token_invalid")
    assert_error(
        client.post("/books", json={"title": "x"}, headers=bearer(forge(claims["sub"], iss="books-auth.example"))),
        401,
        "token_invalid",
    )


@pytest.mark.parametrize(
    "header, code",
    [
        ("", "token_missing"),
        ("Basic abc", "token_missing"),
        ("bearer x.y.z", "token_missing"),
        ("Bearer ", "token_invalid"),
        ("Bearer", "token_invalid"),
        ("Bearer a b", "token_invalid"),
    ],
)
def test_an_authorization_header_that_is_not_one_bearer_token_is_401_as_documented(client, header, code):
    response = client.post("/books/", json={"title": "x"}, headers={"Authorization": header})
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == code
