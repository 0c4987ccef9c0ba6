"""W3C Trace Context, strictly: what a valid `traceparent` and `tracestate` are, and what the
app does with one, in-process (the real-stack checks are in test_trace_stack.py)."""

from __future__ import annotations

import json
import re

import pytest

from service.observability import trace_context

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"

MALFORMED = {
    "empty": "",
    "version ff": f"ff-{TRACE_ID}-{PARENT_ID}-01",
    "version 00 with a field more": f"{VALID}-00",
    "too long by one": VALID + "1",
    "too short by one": VALID[:-1],
    "all-zero trace id": f"00-{'0' * 32}-{PARENT_ID}-01",
    "all-zero parent id": f"00-{TRACE_ID}-{'0' * 16}-00",
    "upper-case hex": VALID.upper(),
    "not hex": f"00-{TRACE_ID[:-1]}x-{PARENT_ID}-01",
    "underscores for dashes": VALID.replace("-", "_"),
    "a trailing newline": VALID + "\n",
    "a leading space": " " + VALID,
    "non-ASCII digits": VALID.replace("4", "\u0664"),  # ARABIC-INDIC DIGIT FOUR: \d would take it
    "a future version cut short": f"01-{TRACE_ID}-{PARENT_ID}-01x",
    "two headers joined": f"{VALID},{VALID}",
    "huge": "00-" + "a" * 100_000,
}


@pytest.mark.parametrize("value", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_traceparent_is_refused(value):
    assert trace_context.parse_traceparent(value) is None
    trace = trace_context.from_headers(value, "rojo=00f067aa0ba902b7")
    assert trace.trace_id != TRACE_ID and trace.parent_id is None and trace.tracestate is None
    assert re.fullmatch("[0-9a-f]{32}", trace.trace_id) and int(trace.trace_id, 16)


def test_a_valid_traceparent_is_continued_with_its_sampled_flag():
    assert trace_context.parse_traceparent(VALID) == (TRACE_ID, PARENT_ID, True)
    assert trace_context.parse_traceparent(VALID[:-2] + "00") == (TRACE_ID, PARENT_ID, False)
    assert trace_context.parse_traceparent(VALID[:-2] + "03") == (TRACE_ID, PARENT_ID, True)  # unknown flags kept out
    trace = trace_context.from_headers(VALID, "congo=t61rcWkgMzE")
    assert (trace.trace_id, trace.parent_id, trace.sampled, trace.tracestate) == (
        TRACE_ID,
        PARENT_ID,
        True,
        "congo=t61rcWkgMzE",
    )
    assert re.fullmatch(f"00-{TRACE_ID}-[0-9a-f]{{16}}-01", trace.traceresponse())
    assert trace.span_id != PARENT_ID


def test_a_later_version_may_carry_more_fields():
    """The specification's forward rule: a receiver of version 01+ reads the 00 fields."""
    assert trace_context.parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-01") == (TRACE_ID, PARENT_ID, True)
    assert trace_context.parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-01-what-comes-next") == (
        TRACE_ID,
        PARENT_ID,
        True,
    )


TRACESTATES = {
    "one member": ("rojo=00f067aa0ba902b7", "rojo=00f067aa0ba902b7"),
    "two, spaces trimmed": ("rojo=1 , congo=2", "rojo=1,congo=2"),
    "empty members dropped": ("rojo=1,,congo=2,", "rojo=1,congo=2"),
    "multi-tenant key": ("fw529a3039@dt=abc", "fw529a3039@dt=abc"),
    "32 members": (",".join(f"k{i}=v" for i in range(32)), ",".join(f"k{i}=v" for i in range(32))),
}
BAD_TRACESTATES = {
    "33 members": ",".join(f"k{i}=v" for i in range(33)),
    "longer than 512": "k=" + "v" * 255 + ",j=" + "v" * 255,
    "huge": "k=v," * 20_000,
    "a duplicate key": "rojo=1,rojo=2",
    "upper-case key": "Rojo=1",
    "no value": "rojo",
    "a comma in the value": "rojo=a=b",
    "a control character": "rojo=a\x07b",
    "non-ASCII": "rojo=caf\u00e9",
}


@pytest.mark.parametrize("value, kept", TRACESTATES.values(), ids=TRACESTATES.keys())
def test_a_valid_tracestate_is_kept(value, kept):
    assert trace_context.valid_tracestate(value) == kept


@pytest.mark.parametrize("value", BAD_TRACESTATES.values(), ids=BAD_TRACESTATES.keys())
def test_a_bad_or_oversized_tracestate_is_dropped(value):
    assert trace_context.valid_tracestate(value) is None
    assert trace_context.from_headers(VALID, value).tracestate is None


def test_a_tracestate_without_a_valid_traceparent_is_dropped():
    assert trace_context.from_headers(None, "rojo=1").tracestate is None
    assert trace_context.from_headers("00-bad", "rojo=1").tracestate is None


def test_new_ids_are_random_non_zero_hex_of_their_length():
    ids = {trace_context.new_id(128) for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    assert all(re.fullmatch("[0-9a-f]{16}", trace_context.new_id(64)) for _ in range(100))


# ---- in the app ---------------------------------------------------------------------------------


def log_lines(log_dir) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "app.log").read_text().splitlines() if line.strip()]


def test_the_trace_id_is_on_the_access_line_the_error_body_and_traceresponse(make_app, tmp_path):
    app = make_app(LOG_DIR=str(tmp_path), LOG_CONSOLE="0")
    client = app.test_client()
    response = client.get("/books/999999", headers={"traceparent": VALID, "X-Request-ID": "tc-1"})
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["trace_id"] == TRACE_ID and error["request_id"] == "tc-1"
    assert response.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")

    response = client.get("/books/999999", headers={"traceparent": "00-" + "z" * 60, "X-Request-ID": "tc-2"})
    assert response.status_code == 404
    new_trace = response.get_json()["error"]["trace_id"]
    assert new_trace != TRACE_ID

    response = client.get("/healthz", headers={"traceparent": VALID, "X-Request-ID": "tc-3"})
    assert response.status_code == 200 and response.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")

    access = {line["request_id"]: line for line in log_lines(tmp_path) if line.get("event") == "access"}
    assert access["tc-1"]["trace_id"] == TRACE_ID
    assert access["tc-2"]["trace_id"] == new_trace
    assert access["tc-3"]["trace_id"] == TRACE_ID


def test_a_method_refused_before_flask_keeps_the_callers_trace(make_app, tmp_path):
    """The WSGI guard's 405 (service/guards.py) answers before any Flask hook: the same trace."""
    app = make_app(LOG_DIR=str(tmp_path), LOG_CONSOLE="0")
    response = app.test_client().open("/books/", method="PROPFIND", headers={"traceparent": VALID})
    assert response.status_code == 405
    assert response.get_json()["error"]["trace_id"] == TRACE_ID
    assert response.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")
    [line] = [r for r in log_lines(tmp_path) if r.get("event") == "access" and r.get("status") == 405]
    assert line["trace_id"] == TRACE_ID
