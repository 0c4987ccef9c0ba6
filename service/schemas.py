"""Field types shared by the request schemas: limits every string a client can send."""

from __future__ import annotations

from marshmallow import ValidationError, fields, validate


def _encodable(value: str) -> None:
    # Lone surrogates (legal in JSON: "\ud800") cannot be encoded as UTF-8 and would fail inside
    # the database driver as a 500; refuse them here.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Must be valid Unicode text.") from None


def text(*, min_length: int, max_length: int, **kwargs) -> fields.String:
    """A string with length bounds that is always safe to store: Postgres text cannot hold NUL
    (the Regexp, which also documents the rule as an OpenAPI `pattern`), nor lone surrogates."""
    return fields.String(
        validate=[
            validate.Length(min=min_length, max=max_length),
            validate.Regexp("^[^\x00]*$", error="Must not contain NUL characters."),
            _encodable,
        ],
        **kwargs,
    )


class NormalisedEmail(fields.Email):
    """Emails compare case-insensitively; store and look them up stripped and lower-cased."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = value.strip().lower()
        return super()._deserialize(value, attr, data, **kwargs)
