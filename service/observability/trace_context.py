"""W3C Trace Context (https://www.w3.org/TR/trace-context/): one trace id per request.

A caller's `traceparent` is continued when it is valid; anything else (absent, malformed, an
unknown shape, all-zero ids, upper-case hex) starts a new trace, never an error, as the
specification asks of a receiver. The service makes no outgoing calls, so the trace is
propagated on nothing but its own signals: every log line of the request, the Sentry event,
the JSON error body, and the response's `traceresponse` header (Trace Context Level 2), which
names the trace and this service's span in it. nginx starts the trace at the edge when the
client sent none (deploy/nginx/flaskapi.conf).

`tracestate` is kept only beside a valid `traceparent`, and only when it is a well-formed list
within the specification's bounds (32 members, 512 characters); otherwise it is dropped.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACERESPONSE = "traceresponse"

# version 00 exactly; a later version may append fields after a "-" (the spec's forward rule)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x20-\x7e]*)?", re.ASCII)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
TRACESTATE_MAX_CHARS = 512
TRACESTATE_MAX_MEMBERS = 32
# key = simple-key / multi-tenant-key, value = 0..255 printable ASCII without "," or "=", not
# ending in a space
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_*/-]{0,255}|[a-z0-9][a-z0-9_*/-]{0,240}@[a-z][a-z0-9_*/-]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]",
    re.ASCII,
)


class Trace(NamedTuple):
    """The trace a request belongs to: `span_id` is this service's span, `parent_id` the
    caller's (None for a trace started here)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    sampled: bool
    tracestate: str | None

    def traceresponse(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid `traceparent`, None otherwise."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def valid_tracestate(value: str) -> str | None:
    """`value` when it is a tracestate list within the bounds (members joined as sent), None
    otherwise: the state of a trace is opaque to us, so a doubtful one is not passed on."""
    if not value or len(value) > TRACESTATE_MAX_CHARS:
        return None
    members = [member.strip(" \t") for member in value.split(",")]
    members = [member for member in members if member]  # empty members are allowed and dropped
    if not members or len(members) > TRACESTATE_MAX_MEMBERS:
        return None
    if not all(_TRACESTATE_MEMBER.fullmatch(member) for member in members):
        return None
    keys = [member.partition("=")[0] for member in members]
    if len(set(keys)) != len(keys):
        return None
    return ",".join(members)


def new_id(bits: int) -> str:
    """A random non-zero id of `bits` bits in lower-case hex (the random module reseeds itself
    in a forked worker)."""
    while True:
        value = random.getrandbits(bits)
        if value:
            return f"{value:0{bits // 4}x}"


def _new_trace_and_span() -> tuple[str, str]:
    """A trace id and a span id from one draw of 192 bits (~0.7 us; os.urandom is slower, and
    uuid4 takes 4 us on the development machine), neither of them zero."""
    while True:
        ids = f"{random.getrandbits(192):048x}"
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
            return trace_id, span_id


def from_headers(traceparent: str | None, tracestate: str | None) -> Trace:
    """The request's trace: the caller's continued, or a new one."""
    new_trace_id, span_id = _new_trace_and_span()
    parent = parse_traceparent(traceparent) if traceparent else None
    if parent is None:
        return Trace(new_trace_id, span_id, None, False, None)
    trace_id, parent_id, sampled = parent
    return Trace(trace_id, span_id, parent_id, sampled, valid_tracestate(tracestate) if tracestate else None)


def from_environ(environ: dict) -> Trace:
    """The trace of a request answered before Flask sees it (service/guards.py)."""
    return from_headers(environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_TRACESTATE"))
