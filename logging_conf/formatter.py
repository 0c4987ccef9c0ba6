"""The JSON line format shared by gunicorn's master, its workers and the Flask app.

One event is one line of valid JSON: exceptions are structured objects, the request context
(request id, trace id, method, path, remote address) is attached to every line written while a request is
being served, and no string in a line holds a control character (`escape_controls`).
"""

from __future__ import annotations

import logging
import math
import re
import time
import traceback
from itertools import islice
from json.encoder import c_make_encoder, encode_basestring

from flask import g, has_request_context, request
from pythonjsonlogger.json import JsonEncoder
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from logging_conf.redaction import redact

FIELDS = "%(levelname)s %(name)s %(message)s %(process)d"
RENAMES = {"levelname": "level", "name": "logger", "process": "pid"}

_CACHE_ATTR = "_flaskapi_json_line"

# C0 controls, DEL, C1 controls, the line and paragraph separators, and the bidirectional
# controls (ALM, LRM, RLM, LRE..RLO, LRI..PDI: the "Trojan Source" characters).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NATIVE = (int, float, bool, type(None))
# The attributes every LogRecord is made with, before any `extra`: they come first in its __dict__.
_RECORD_ATTRIBUTES = len(logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__)


def _shown(match: re.Match) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every unsafe character (`_UNSAFE`) written as its escape, `\\n`, `\\r`, `\\t`,
    `\\x1b`, `\\u202e`, so a line read with `jq -r` (or `tail` on a terminal) is one line that
    cannot move the cursor, ring, recolour or reorder what is around it. A client writes paths,
    methods and header values; an exception message may quote any of them. Backslashes are left
    as they are: the escape is for the reader's safety and is not meant to be reversed (a client
    who sends a literal backslash-n shows the same two characters)."""
    return _UNSAFE.sub(_shown, text)


class JsonFormatter(_JsonFormatter):
    """Records as JSON lines in which every string (keys, values, nested ones, the exception's
    message and traceback, what `extra` objects become) went through `escape_controls`.

    The finished line is checked first and rebuilt escaped only when it could hold an unsafe
    character (it has a backslash, DEL or non-ASCII text that matches): an ordinary access line
    pays two substring scans, ~0.2 us of its ~18 us; a line that needs it is escaped field by
    field and serialised again, ~+15 us (timeit, best of 30, on the 2-core development machine).

    The fields are gathered here rather than by python-json-logger's `add_fields` (same fields,
    same order, same values), and serialised by one encoder built once instead of one per line:
    an access line went from 14 to 8 us (timeit, best of 7). The separators stay json's own
    (`", "`, `": "`): the log recipes grep for `"request_id": "<id>"`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("fmt", FIELDS)
        kwargs.setdefault("rename_fields", RENAMES)
        kwargs.setdefault("timestamp", "timestamp")
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)
        self._encoder = JsonEncoder(ensure_ascii=self.json_ensure_ascii)
        rename = self.rename_fields.get
        self._fields = [(field, rename(field, field)) for field in self._required_fields]
        key = self.timestamp if isinstance(self.timestamp, str) else "timestamp"
        self._timestamp_key = rename(key, key) if self.timestamp else None
        # What `_plain_fields` leaves out must be absent: then it makes what `add_fields` makes.
        self._plain = (
            not self.defaults
            and not self.static_fields
            and not self.rename_fields_keep_missing
            and not self.prefix
            and "asctime" not in self._required_fields
            and type(self).process_log_record is _JsonFormatter.process_log_record
            and type(self).add_fields is JsonFormatter.add_fields
        )

    def format(self, record: logging.LogRecord) -> str:
        # Console and file handlers share this formatter: serialise each record once.
        cached = record.__dict__.get(_CACHE_ATTR)
        if cached is None:
            special = record.exc_info or record.exc_text or record.stack_info or type(record.msg) is dict
            if self._plain and not special:
                cached = redact(self.jsonify_log_record(self._plain_fields(record)))
            else:
                cached = redact(super().format(record))
            record.__dict__[_CACHE_ATTR] = cached
        return cached

    def _plain_fields(self, record: logging.LogRecord) -> dict:
        """`add_fields` of a record without exception, stack or dict message, for a formatter
        without defaults, static fields or kept-missing renames (`_plain`, ours): the same fields
        in the same order, without the steps that add nothing to such a record. Every line but
        an error's takes it: 136k -> 55k instructions an access line (callgrind)."""
        record.message = record.getMessage()  # as python-json-logger's `format`, for later readers
        attributes = record.__dict__
        log_data = {key: attributes.get(field) for field, key in self._fields}
        skip, rename = self._skip_fields, self.rename_fields
        # A LogRecord's own attributes come first (all in `skip`): only what follows is looked at.
        later = islice(attributes, _RECORD_ATTRIBUTES, None) if type(record) is logging.LogRecord else attributes
        for key in later:  # the `extra` fields, and `message`
            if key not in skip and not (isinstance(key, str) and key.startswith("_")):
                log_data[rename.get(key, key)] = attributes[key]
        if self._timestamp_key is not None:
            log_data[self._timestamp_key] = _utc_isoformat(record.created)
        log_data.pop("color_message", None)
        _add_request_context(log_data)
        return log_data

    def _encode(self, log_data: dict) -> str:
        """What `self._encoder.encode(log_data)` returns, from the C encoder it would build, without
        the Python layers around it (json.JSONEncoder.encode and iterencode): -5k instructions."""
        if c_make_encoder is None:
            return self._encoder.encode(log_data)
        encoder = self._encoder
        iterencode = c_make_encoder(
            {} if encoder.check_circular else None,
            encoder.default,
            encode_basestring,
            None,
            encoder.key_separator,
            encoder.item_separator,
            encoder.sort_keys,
            encoder.skipkeys,
            encoder.allow_nan,
        )
        return "".join(iterencode(log_data, 0))

    def jsonify_log_record(self, log_data) -> str:
        line = self._encode(log_data)
        # JSON writes every C0 control as a backslash escape and the rest of `_UNSAFE` raw: a line
        # with no backslash and no DEL that is ASCII, or has none of them, needs nothing more.
        if "\\" not in line and "\x7f" not in line and (line.isascii() or _UNSAFE.search(line) is None):
            return line
        return self._encoder.encode(_escaped(log_data, self._encoder))

    def add_fields(self, log_data, record, message_dict) -> None:
        """python-json-logger's fields (the format's, the message dict, every `extra`, the
        timestamp), without uvicorn's colour duplicate, with the request context."""
        attributes, rename = record.__dict__, self.rename_fields
        for field, value in self.defaults.items():
            log_data[rename.get(field, field)] = value
        for field, key in self._fields:
            log_data[key] = attributes.get(field)
        for data in (self.static_fields, message_dict):
            for key, value in data.items():
                log_data[rename.get(key, key)] = value
        skip = self._skip_fields
        for key in [key for key in attributes if key not in skip]:  # the few `extra` among ~30
            if not (isinstance(key, str) and key.startswith("_")):
                log_data[rename.get(key, key)] = attributes[key]
        if self._timestamp_key is not None:
            log_data[self._timestamp_key] = _utc_isoformat(record.created)
        if self.rename_fields_keep_missing:
            for field in self.rename_fields.values():
                log_data.setdefault(field, None)
        log_data.pop("color_message", None)  # uvicorn/werkzeug colour duplicates
        _add_request_context(log_data)

    def formatException(self, ei):  # noqa: N802 (logging's name)
        exc_type, exc, tb = ei
        return {
            "type": getattr(exc_type, "__qualname__", str(exc_type)),
            "message": str(exc),
            "frames": [
                {"file": frame.filename, "line": frame.lineno, "function": frame.name}
                for frame in traceback.extract_tb(tb)
            ],
            "traceback": "".join(traceback.format_exception(exc_type, exc, tb)),
        }


_second: tuple[float, str] = (math.nan, "")  # the last whole second formatted, and its text


def _utc_isoformat(created: float) -> str:
    """`datetime.fromtimestamp(created, tz=UTC).isoformat()`, the date and time of day formatted
    once a second: 16.5k -> 5k instructions. The microseconds are rounded half to even, as
    datetime rounds them, and left out when zero, as isoformat does."""
    global _second
    fraction, whole = math.modf(created)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        micro -= 1_000_000
        whole += 1.0
    seconds, text = _second  # one tuple: a thread never pairs one second with another's text
    if seconds != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{micro:06d}+00:00" if micro else f"{text}+00:00"


def _escaped(value, encoder: JsonEncoder):
    """`value` with `escape_controls` applied to every string in it. What JSON has no type for
    (a datetime, an object in `extra`) is turned into JSON data by the encoder's own rules first,
    so the text it becomes is escaped too."""
    if isinstance(value, str):
        return _UNSAFE.sub(_shown, value)
    if isinstance(value, _NATIVE):
        return value
    if isinstance(value, dict):
        return {(_UNSAFE.sub(_shown, k) if isinstance(k, str) else k): _escaped(v, encoder) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v, encoder) for v in value]
    return _escaped(encoder.default(value), encoder)


def _add_request_context(log_data: dict) -> None:
    """Fields known while a Flask request is being served; cheap no-op outside one."""
    if "remote_addr" in log_data:  # the caller passed the context (the access line does)
        return
    if not has_request_context():
        return
    log_data.setdefault("request_id", g.get("request_id"))
    log_data.setdefault("trace_id", g.get("trace_id"))
    log_data.setdefault("method", request.method)
    log_data.setdefault("path", request.path)
    log_data.setdefault("remote_addr", request.remote_addr)
