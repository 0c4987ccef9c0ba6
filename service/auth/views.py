"""`/auth/register` and `/auth/login`: thin views over `queries`, `passwords` and `throttle`.

The limits are asked first, before any argon2 work: a refused request costs one round trip.
Both hash, so both are marked `hashes_passwords`: under gunicorn they are served by the hashing
bulkhead's threads, and may be shed with 503 auth_busy (service/hashing_bulkhead.py)."""

from __future__ import annotations

from apiflask import APIBlueprint, Schema
from apiflask.fields import DateTime, Integer, String
from flask import current_app, g
from marshmallow import validate

from service.auth import queries, throttle, tokens
from service.errors import APIError
from service.hashing_bulkhead import hashes_passwords
from service.models import EMAIL_MAX
from service.schemas import NormalisedEmail, secret

bp = APIBlueprint("auth", __name__, url_prefix="/auth", tag="Auth")

PASSWORD_MIN = 6  # the lesson's load test registers with "secret"
PASSWORD_MAX = 128


class Credentials(Schema):
    email = NormalisedEmail(
        required=True, validate=validate.Length(max=EMAIL_MAX), metadata={"example": "reader@example.com"}
    )
    password = secret(
        min_length=PASSWORD_MIN,
        max_length=PASSWORD_MAX,
        required=True,
        load_only=True,
        metadata={"example": "correct horse battery"},
    )


class UserOut(Schema):
    id = Integer(required=True)
    email = String(required=True)
    created_at = DateTime(required=True)


class TokenOut(Schema):
    token = String(required=True, metadata={"description": "JWT; send as 'Authorization: Bearer <token>'"})
    token_type = String(required=True, metadata={"example": "Bearer"})
    expires_in = Integer(required=True, metadata={"description": "seconds"})


def _passwords():
    return current_app.extensions["passwords"]


def _retry_later(description: str) -> dict:
    """An answer in the one error shape, with Retry-After."""
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPError"}}},
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }


# details.reason: service/auth/throttle.py REASONS
TOO_MANY = _retry_later("Over a login or registration limit (docs/api.md); retry after Retry-After seconds")
# details.reason: service/hashing_bulkhead.py REASONS
AUTH_BUSY = _retry_later(
    "auth_busy: too many logins and registrations waiting on this server (docs/api.md); retry after Retry-After seconds"
)


@bp.post("/register")
@hashes_passwords
@bp.input(Credentials, arg_name="body")
@bp.output(UserOut, status_code=201)
@bp.doc(
    summary="Register a user",
    responses={409: "Email already registered", 422: "Invalid input", 429: TOO_MANY, 503: AUTH_BUSY},
)
def register(body):
    throttle.current().check_register()
    password_hash = _passwords().hash(body["password"])  # CPU first, holding no connection
    user = queries.create_user(email=body["email"], password_hash=password_hash)
    if user is None:
        raise APIError(409, "An account with this email already exists", code="email_taken")
    return user


@bp.post("/login")
@hashes_passwords
@bp.input(Credentials, arg_name="body")
@bp.output(TokenOut)
@bp.doc(summary="Log in and get a JWT", responses={401: "Wrong email or password", 429: TOO_MANY, 503: AUTH_BUSY})
def login(body):
    attempt = throttle.current().login_attempt(body["email"])  # refused: 429, the password never checked
    found = queries.credentials_for(email=body["email"])
    user_id, password_hash = found if found else (None, None)
    passwords = _passwords()
    if not passwords.verify(password_hash, body["password"]):
        attempt.failed()
        raise APIError(401, "Wrong email or password", code="bad_credentials")
    attempt.succeeded()
    g.user_id = str(user_id)  # for the access line
    if passwords.needs_rehash(password_hash):  # cost settings were raised since this hash
        queries.replace_password_hash(user_id=user_id, password_hash=passwords.hash(body["password"]))
    expires = current_app.config["JWT_ACCESS_TOKEN_EXPIRES"]
    return {
        "token": tokens.issue(user_id),
        "token_type": "Bearer",
        "expires_in": int(expires.total_seconds()),
    }
