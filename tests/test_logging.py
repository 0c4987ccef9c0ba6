"""The JSON log format and request ids, in-process (the multi-process tests are in
test_logging_stack.py)."""
from __future__ import annotations

import json
import logging

import pytest

from logging_conf.formatter import JsonFormatter
from service.observability.metrics import UNHANDLED

REQUIRED = {"timestamp", "level", "logger", "message", "pid"}


def _record(msg, *args, exc_info=None, **extra):
    record = logging.LogRecord("test.logger", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_multiline_message_is_one_valid_json_line():
    line = JsonFormatter().format(_record("first\nsecond\n\"quoted\"\ttab"))
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "first\nsecond\n\"quoted\"\ttab"
    assert REQUIRED <= data.keys()
    assert data["level"] == "WARNING" and data["logger"] == "test.logger"
    assert data["timestamp"].endswith("+00:00")  # ISO-8601, UTC


def test_exceptions_are_structured():
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        import sys

        line = JsonFormatter().format(_record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line
    exc = json.loads(line)["exc_info"]
    assert exc["type"] == "ValueError"
    assert exc["message"] == "bad value\nsecond line"
    assert exc["frames"][-1]["function"] == "test_exceptions_are_structured"
    assert "Traceback" in exc["traceback"]


@pytest.mark.parametrize("text", [
    "Authorization: Bearer abc.def.ghi",
    'login {"password": "hunter2-secret"}',
    "token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl",
    "password=hunter2-secret&x=1",
])
def test_credentials_are_redacted_from_any_line(text):
    line = JsonFormatter().format(_record(text))
    for secret in ("abc.def.ghi", "hunter2-secret", "eyJhbGciOiJIUzI1NiJ9"):
        assert secret not in line
    assert "[REDACTED" in line


def test_request_id_is_echoed_and_generated_when_absent_or_insane(client):
    assert client.get("/healthz", headers={"X-Request-ID": "req-42.a:b"}).headers["X-Request-ID"] == "req-42.a:b"
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    for insane in ("x" * 129, "has space", "semi;colon", "new\\nline", "ünïcode"):
        echoed = client.get("/healthz", headers={"X-Request-ID": insane}).headers["X-Request-ID"]
        assert echoed != insane and len(echoed) == 32


def test_error_bodies_carry_the_request_id(client):
    response = client.get("/books/0", headers={"X-Request-ID": "trace-me"})
    assert response.status_code == 404
    assert response.get_json()["error"]["request_id"] == "trace-me"


def test_an_error_in_a_request_logs_its_stack_with_the_request_id(make_app, tmp_path):
    app = make_app(LOG_DIR=str(tmp_path / "logs"), LOG_CONSOLE="0")

    @app.get("/boom")
    def boom():
        raise RuntimeError("exploded inside the view")

    def unhandled_count() -> float:
        return sum(sample.value for family in UNHANDLED.collect() for sample in family.samples
                   if sample.name.endswith("_total"))

    before = unhandled_count()
    response = app.test_client().get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert unhandled_count() - before == 1
    assert "exploded" not in response.get_data(as_text=True)  # no internals to the client
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = [json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines()]
    errors = [line for line in lines if line.get("event") == "unhandled_exception"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "boom-1"
    assert errors[0]["level"] == "ERROR"
    assert errors[0]["exc_info"]["type"] == "RuntimeError"
    assert any(frame["function"] == "boom" for frame in errors[0]["exc_info"]["frames"])
    access = [line for line in lines if line.get("event") == "access"]
    assert [(a["request_id"], a["status"], a["route"], a["level"]) for a in access] == \
        [("boom-1", 500, "/boom", "ERROR")]


def test_rotated_files_are_gzipped_when_asked(tmp_path):
    import gzip
    import time

    from concurrent_log_handler import ConcurrentTimedRotatingFileHandler

    import logging_conf

    options = dict(logging_conf.build(log_dir=tmp_path, when="S", interval=1, gzip=True)["handlers"]["file"])
    assert options.pop("class") == logging_conf.ROTATING_HANDLER
    options.pop("formatter")
    handler = ConcurrentTimedRotatingFileHandler(**options)
    handler.setFormatter(JsonFormatter())
    try:
        handler.emit(_record("before rotation"))
        time.sleep(1.2)
        handler.emit(_record("after rotation"))
    finally:
        handler.close()
    rotated = list(tmp_path.glob("app.log.*.gz"))
    assert len(rotated) == 1
    assert json.loads(gzip.decompress(rotated[0].read_bytes()))["message"] == "before rotation"
    assert json.loads((tmp_path / "app.log").read_text())["message"] == "after rotation"
