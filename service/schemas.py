"""Field types shared by the request schemas: the rules for every string and integer a client
can send (docs/api.md, "Input rules").

Text (titles, authors, emails) is one visible line of Unicode: no control characters (all of
Cc: C0, DEL and C1, TAB and LF too: a title or an author is a single line shown in lists,
terminals and logs, where a tab or a newline breaks the layout and an ANSI escape repaints it),
no format characters (all of Cf: bidi overrides, isolates and marks that reorder what a reader
sees, zero-width characters and tag characters that hide text or make two equal-looking values
differ), no line or paragraph separators (U+2028, U+2029), no lone surrogates (not Unicode,
unstorable), and not blank (only spaces). The price: emoji joined with U+200D (a family) and
scripts that write U+200C (Persian, some Indic spellings) are refused too.

Passwords are opaque: anything storable (no NUL, no lone surrogates), never normalised, so
every existing hash still verifies.

Integers in paths and queries have one spelling, canonical ASCII decimal: `int()` and
Werkzeug's `int` converter also read Arabic-Indic and full-width digits (U+0661, U+FF11),
"0001", " 5", "+5" and "1_0" (and marshmallow reads "5.0"), so one row had many URLs.
"""

from __future__ import annotations

import re
import unicodedata

from marshmallow import ValidationError, fields, validate

# Refused in text: every character of categories Cc, Cf, Zl and Zp as of Unicode 15.1 (Python
# 3.13; the ranges are a superset of 3.11's Unicode 14, where U+13439..1343F are unassigned).
# tests/test_input_rules.py checks them against the running Python's unicodedata.
REFUSED_RANGES = (
    (0x0000, 0x001F),
    (0x007F, 0x009F),
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)
BIDI_CONTROLS = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])
# A value of only these is blank: the space separators (Zs), all that str.isspace() adds to
# what REFUSED_RANGES already refuses.
SPACES = " \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"


def _char_class(ranges, extra: str = "") -> str:
    return "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges) + extra


_REFUSED = _char_class(REFUSED_RANGES)
# The rule as a regular expression, for the OpenAPI document: optional spaces, one character
# that is neither refused nor a space, then anything not refused. Unambiguous (the first two
# classes are disjoint), so a backtracking engine matches it in linear time. Written with the
# characters themselves (the JSON document shows them as \u escapes), as Python, Rust and
# Unicode-aware ECMAScript engines all read it.
TEXT_PATTERN = f"^[{SPACES}]*[^{_REFUSED}{SPACES}][^{_REFUSED}]*$"
_REFUSED_OR_SURROGATE = re.compile(f"[{_REFUSED}\ud800-\udfff]")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _describe(char: str) -> str:
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        return "a lone surrogate (not Unicode text)"
    if code in BIDI_CONTROLS:
        return "a bidirectional control character"
    category = unicodedata.category(char)
    if category == "Cc":
        return "a control character"
    if category in ("Zl", "Zp"):
        return "a line or paragraph separator"
    return "an invisible format character"


def _refuse(match: re.Match) -> ValidationError:
    char = match.group()
    return ValidationError(f"Must not contain {_describe(char)} (U+{ord(char):04X} at position {match.start()}).")


def check_storable(value: str) -> None:
    """No lone surrogates ("\\ud800" is legal JSON but not UTF-8: the database driver would fail
    on it with a 500) and no NUL (Postgres text cannot hold it)."""
    found = _UNSTORABLE.search(value)
    if found:
        raise _refuse(found)


def check_text(value: str) -> None:
    """The text rule (module doc): one regex search and one strip, ~0.5 us for a title."""
    found = _REFUSED_OR_SURROGATE.search(value)
    if found:
        raise _refuse(found)
    if not value.strip(SPACES):
        raise ValidationError("Must not be blank.")


class TextRule(validate.Validator):
    """check_text as a marshmallow validator. Its `regex` is what apispec writes as the field's
    OpenAPI `pattern` (TEXT_PATTERN: the same rule, tests/test_input_rules.py)."""

    regex = re.compile(TEXT_PATTERN)
    error = "Must be visible text."

    def __call__(self, value: str) -> str:
        check_text(value)
        return value


class StorableRule(validate.Validator):
    """check_storable as a marshmallow validator; its OpenAPI `pattern` says no NUL (a JSON
    Schema string cannot hold a lone surrogate)."""

    regex = re.compile("^[^\x00]*$")
    error = "Must be storable text."

    def __call__(self, value: str) -> str:
        check_storable(value)
        return value


TEXT_RULE = (
    "one line of visible Unicode text: no control characters (tab and newline included), "
    "no format characters (bidi controls, zero-width characters, tags), no line or paragraph "
    "separators, not only spaces"
)


def text(*, min_length: int, max_length: int, **kwargs) -> fields.String:
    """A line of visible text (titles, authors) within length bounds (module doc)."""
    kwargs["metadata"] = {"description": TEXT_RULE, **kwargs.get("metadata", {})}
    return fields.String(validate=[validate.Length(min=min_length, max=max_length), TextRule()], **kwargs)


def secret(*, min_length: int, max_length: int, **kwargs) -> fields.String:
    """Opaque text (passwords): storable, otherwise anything, and never normalised."""
    return fields.String(validate=[validate.Length(min=min_length, max=max_length), StorableRule()], **kwargs)


def normalise_email(value: str) -> str:
    """NFKC, then case folding, then stripped: "\uff21@Example.com" (full-width), "a@example.com " and
    "A@EXAMPLE.COM" are one account, as are "straße@" and "STRASSE@" (lower() keeps "ß")."""
    return unicodedata.normalize("NFKC", value).casefold().strip()


class NormalisedEmail(fields.Email):
    """An email, stored and looked up normalised (normalise_email), so the unique index is the
    whole uniqueness rule. The text rule runs first, on the value as sent (so the OpenAPI
    pattern describes it; normalising neither adds nor removes a refused character), and
    marshmallow's Email validation only ever sees text that passed it."""

    def __init__(self, **kwargs) -> None:
        metadata = {
            "description": f"{TEXT_RULE}; compared and stored NFKC-normalised, case-folded and stripped",
            "pattern": TEXT_PATTERN,
            **kwargs.pop("metadata", {}),
        }
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            check_text(value)
            value = normalise_email(value)
        return super()._deserialize(value, attr, data, **kwargs)


# --- integers -----------------------------------------------------------------------------------

CANONICAL_INT = "[1-9][0-9]*"  # positive, ASCII digits, no sign, spaces or leading zeros
_CANONICAL_INT = re.compile(CANONICAL_INT)


def canonical_int(value: str, maximum: int) -> int | None:
    """`value` as a positive integer up to `maximum` if it is written canonically, else None.
    The length is checked before int() reads it (no 4,300-digit ValueError, no quadratic cost)."""
    if len(value) > len(str(maximum)) or not _CANONICAL_INT.fullmatch(value):
        return None
    number = int(value)
    return number if number <= maximum else None


class CanonicalInt(fields.Integer):
    """A positive integer in a query string, 1..maximum, spelt only as canonical_int reads it
    (documented as an OpenAPI integer with its minimum and maximum)."""

    def __init__(self, *, maximum: int, **kwargs) -> None:
        self.maximum = maximum
        super().__init__(validate=validate.Range(min=1, max=maximum), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("Must be a whole number.")
        number = canonical_int(value, self.maximum)
        if number is None:
            raise ValidationError(
                f"Must be a whole number from 1 to {self.maximum} in ASCII digits, "
                "without sign, spaces or leading zeros."
            )
        return number
