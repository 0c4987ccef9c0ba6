"""The JSON line format shared by gunicorn's master, its workers and the Flask app.

One event is one line of valid JSON: multi-line messages and tracebacks are escaped inside
strings, exceptions are structured objects, and the request context (request id, method, path,
remote address) is attached to every line written while a request is being served.
"""

from __future__ import annotations

import logging
import traceback

from flask import g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from logging_conf.redaction import redact

FIELDS = "%(levelname)s %(name)s %(message)s %(process)d"
RENAMES = {"levelname": "level", "name": "logger", "process": "pid"}

_CACHE_ATTR = "_flaskapi_json_line"


class JsonFormatter(_JsonFormatter):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("fmt", FIELDS)
        kwargs.setdefault("rename_fields", RENAMES)
        kwargs.setdefault("timestamp", "timestamp")
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        # Console and file handlers share this formatter: serialise each record once.
        cached = record.__dict__.get(_CACHE_ATTR)
        if cached is None:
            cached = redact(super().format(record))
            record.__dict__[_CACHE_ATTR] = cached
        return cached

    def add_fields(self, log_data, record, message_dict) -> None:
        super().add_fields(log_data, record, message_dict)
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


def _add_request_context(log_data: dict) -> None:
    """Fields known while a Flask request is being served; cheap no-op outside one."""
    if "remote_addr" in log_data:  # the caller passed the context (the access line does)
        return
    if not has_request_context():
        return
    log_data.setdefault("request_id", g.get("request_id"))
    log_data.setdefault("method", request.method)
    log_data.setdefault("path", request.path)
    log_data.setdefault("remote_addr", request.remote_addr)
