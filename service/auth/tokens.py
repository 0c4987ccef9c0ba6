"""The one token policy: what a JWT the service issues carries, and what a request's token must
satisfy before any view (and so any database work) runs. docs/api.md#token-claims says the same
for clients.

Issued at login (`issue`): `sub` (the user id, a decimal string), `iat`, `exp` (`iat` +
JWT_ACCESS_TOKEN_EXPIRES), `iss` (JWT_ISSUER), `aud` (JWT_AUDIENCE), signed with HS256 and
JWT_SECRET_KEY; flask-jwt-extended adds `jti`, `type` and `fresh`, which nothing here relies on.

Checked on every protected request, in flask-jwt-extended's order:

1. PyJWT's decode, configured below: the signature, HS256 only (no `none`, no other algorithm
   with the same key); `iss` equal to JWT_ISSUER and `aud` naming JWT_AUDIENCE, both required;
   `exp` not passed (else 401 `token_expired`), `iat` and, when present, `nbf` not in the future;
   `sub` a string.
2. `_follows_policy` (the token_verification_loader): `exp`, `iat` and `sub` present (PyJWT only
   checks the time claims a token happens to carry: without `exp` a token was valid forever);
   `exp` and `iat` integers (PyJWT also reads "9999999999" as a time); `exp - iat` at most
   JWT_ACCESS_TOKEN_EXPIRES (no token outlives what the service issues); `sub` a canonical user
   id (`subject_id`).
3. The user_lookup_loader turns `sub` into the int that views get from `current_user_id()`,
   through the same `subject_id`.

Every refusal is 401 `token_invalid` in the one error shape (service/errors.py JWT_ERRORS).
`nbf` and `jti` are not required: a token is valid from its `iat` (an `nbf` would repeat it), and
`jti` names a token for a revocation list, which the service does not keep.
"""

from __future__ import annotations

import re
from datetime import timedelta

from flask import Flask, current_app
from flask_jwt_extended import JWTManager, create_access_token, get_current_user

from service.models import MAX_ID
from service.settings import Settings

ALGORITHM = "HS256"
REQUIRED = ("exp", "iat", "sub")  # iss and aud: required by PyJWT once JWT_DECODE_ISSUER/AUDIENCE are set
# A canonical decimal: ASCII digits only (`int()` also reads " 1", "\u0661" and "1_0"), no sign, no
# leading zero, at most 19 digits (MAX_ID has 19; `subject_id` checks the value).
SUBJECT = re.compile(r"[1-9][0-9]{0,18}")


def flask_config(settings: Settings) -> dict:
    """flask-jwt-extended's settings: every knob the policy depends on, set explicitly."""
    return {
        "JWT_SECRET_KEY": settings.jwt_secret_key,
        "JWT_ALGORITHM": ALGORITHM,
        "JWT_DECODE_ALGORITHMS": [ALGORITHM],
        "JWT_ACCESS_TOKEN_EXPIRES": timedelta(seconds=settings.jwt_access_token_expires),
        "JWT_TOKEN_LOCATION": ["headers"],
        "JWT_IDENTITY_CLAIM": "sub",
        "JWT_VERIFY_SUB": True,
        "JWT_ENCODE_ISSUER": settings.jwt_issuer,
        "JWT_DECODE_ISSUER": settings.jwt_issuer,
        "JWT_ENCODE_AUDIENCE": settings.jwt_audience,
        "JWT_DECODE_AUDIENCE": settings.jwt_audience,
        "JWT_ENCODE_NBF": False,
        "JWT_DECODE_LEEWAY": 0,
    }


def init_app(app: Flask, jwt: JWTManager) -> None:
    """Bind flask-jwt-extended to `app` with this policy's checks; refusals answer in our shape."""
    from service.errors import register_jwt_errors

    jwt.init_app(app)
    jwt.token_verification_loader(_follows_policy)
    jwt.user_lookup_loader(_user_id)
    register_jwt_errors(jwt)
    jwt.expired_token_loader(_expired)  # in place of errors.py's plain token_expired


def issue(user_id: int) -> str:
    """The access token for a user who just logged in."""
    return create_access_token(identity=str(user_id))


def subject_id(sub: object) -> int | None:
    """The user id a `sub` claim names, or None when it is not a canonical decimal within
    bigint: no database lookup is ever made with anything else."""
    if not isinstance(sub, str) or SUBJECT.fullmatch(sub) is None:
        return None
    number = int(sub)
    return number if number <= MAX_ID else None


def current_user_id() -> int:
    """The verified token's user id, inside a @jwt_required view."""
    return get_current_user()


def _is_time(value: object) -> bool:
    return type(value) is int  # not bool, not float, not a numeric string


def _follows_policy(_header: dict, claims: dict) -> bool:
    """What PyJWT's decode does not check (module docstring, step 2); False answers 401."""
    if any(name not in claims for name in REQUIRED):
        return False
    if not (_is_time(claims["exp"]) and _is_time(claims["iat"])):
        return False
    lifetime = current_app.config["JWT_ACCESS_TOKEN_EXPIRES"].total_seconds()
    if claims["exp"] - claims["iat"] > lifetime:
        return False
    return subject_id(claims["sub"]) is not None


def _expired(header: dict, claims: dict):
    """`token_expired` ("log in again") only for a token that was valid until its `exp`: one that
    breaks the policy too (say `exp: true`, which PyJWT reads as 1970) is `token_invalid`."""
    from service.errors import token_error

    return token_error("token_expired" if _follows_policy(header, claims) else "token_invalid")


def _user_id(_header: dict, claims: dict) -> int | None:
    """The user id for `current_user_id()`, without a database lookup (None answers 401)."""
    return subject_id(claims["sub"])
