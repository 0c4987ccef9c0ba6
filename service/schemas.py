"""Field types shared by the request schemas: limits every string a client can send."""
from __future__ import annotations

from marshmallow import ValidationError, fields, validate


def _storable(value: str) -> None:
    # Postgres text cannot hold NUL, and lone surrogates (legal in JSON "\ud800") cannot be
    # encoded as UTF-8: both would fail inside the database driver as a 500, so refuse them here.
    if "\x00" in value:
        raise ValidationError("Must not contain NUL characters.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Must be valid Unicode text.") from None


def text(*, min_length: int, max_length: int, **kwargs) -> fields.String:
    """A string with length bounds that is always safe to store. (The Regexp documents the NUL
    rule in the OpenAPI document as a `pattern`; `_storable` also refuses lone surrogates.)"""
    return fields.String(
        validate=[validate.Length(min=min_length, max=max_length),
                  validate.Regexp("^[^\x00]*$", error="Must not contain NUL characters."),
                  _storable],
        **kwargs,
    )


class NormalisedEmail(fields.Email):
    """Emails compare case-insensitively; store and look them up stripped and lower-cased."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = value.strip().lower()
        return super()._deserialize(value, attr, data, **kwargs)
