"""What counts as a secret, for the log lines and the Sentry events alike.

Defence in depth: nothing logs bodies or headers, but an exception message or a third-party
logger might still carry a credential. `redact` removes those from any text (the finished log
line, every string of a Sentry event); `scrub_value` also filters every value kept under a
sensitive key (a header, an `extra`), whatever it looks like.

Part of logging_conf, not of service: gunicorn loads the logging configuration before the app.
"""

from __future__ import annotations

import re
from typing import Any

_REDACTIONS = (
    (re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+"), "[REDACTED-JWT]"),
    (re.compile(r"(?i)(bearer\s+)[^\s\"'\\,]+"), r"\1[REDACTED]"),
    # key = value / "key": "value", also inside an already JSON-escaped string (\\")
    (
        re.compile(
            r"(?i)((?:password|passwd|secret|token|authorization)(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'])?)"
            r"[^\"'\\,\s}&]+"
        ),
        r"\1[REDACTED]",
    ),
)

SENSITIVE_KEY = re.compile(r"(?i)pass(word|wd)?|secret|token|authorization|cookie|session|jwt|api[-_]?key")
FILTERED = "[Filtered]"


def redact(text: str) -> str:
    lowered = text.lower()
    # the common case (an access line): six substring scans instead of three regexes, written
    # out rather than a generator over them (16.8k -> 12.6k instructions an access line)
    if not (
        "eyj" in lowered
        or "bearer" in lowered
        or "pass" in lowered
        or "secret" in lowered
        or "token" in lowered
        or "authoriz" in lowered
    ):
        return text
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def scrub_value(value: Any, key: str = "") -> Any:
    """`value` with every scalar under a sensitive key replaced by FILTERED and every string
    redacted, through nested dicts and lists."""
    if key and SENSITIVE_KEY.search(key) and isinstance(value, (str, bytes, int, float)):
        return FILTERED
    if isinstance(value, dict):
        return {k: scrub_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value
