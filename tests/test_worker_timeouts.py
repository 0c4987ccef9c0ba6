"""In process: the test-only sleep route exists only in testing, and the stacks a timed-out
worker reports name the request each thread serves (the real abort: test_worker_reports_stack.py)."""

from __future__ import annotations

import threading

import pytest

from service.observability import request_log, worker_timeouts
from tests.conftest import eventually


@pytest.mark.parametrize("env", ["development", "production"])
def test_the_sleep_route_exists_only_in_testing(make_app, env):
    app = make_app(FLASK_ENV=env, LOG_TO_FILE="0")
    assert not [rule.rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/_test")]
    response = app.test_client().get("/_test/sleep?seconds=0")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_the_sleep_route_in_testing_is_bounded_and_undocumented(client):
    assert client.get("/_test/sleep?seconds=0").get_json() == {"slept": 0.0}
    for bad in ("", "abc", "-1", "nan", "inf", "121"):
        response = client.get(f"/_test/sleep?seconds={bad}")
        assert response.status_code == 400, bad
        assert response.get_json()["error"]["code"] == "bad_request"
    assert not [path for path in client.get("/openapi.json").get_json()["paths"] if path.startswith("/_test")]


def test_thread_stacks_name_the_request_each_thread_serves(client):
    """The per-thread record of the request id and trace id, read from another thread while the
    request is in its view, and gone once it is answered."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"X-Request-ID": "held-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    answered = []
    serving = threading.Thread(
        target=lambda: answered.append(client.get("/_test/sleep?seconds=1.5", headers=headers).status_code),
        name="serving-held-1",
    )
    serving.start()
    try:
        assert eventually(lambda: serving.ident in request_log.serving, True)
        stacks = {t["thread"]: t for t in worker_timeouts.thread_stacks()}
        held = stacks["serving-held-1"]
        assert held["request_id"] == "held-1" and not held["current"]
        assert held["trace_id"] == trace_id and held["trace"].parent_id == "00f067aa0ba902b7"
        assert held["frames"][-1]["function"] == "sleep_for_test"
        assert "time.sleep(seconds)" in held["stack"]
        me = stacks[threading.current_thread().name]
        assert me["current"] and me["request_id"] is None and me["trace_id"] is None
        assert me["frames"][-1]["function"] == "thread_stacks"  # not called from an abort handler
    finally:
        serving.join(10)
    assert answered == [200]
    assert serving.ident not in request_log.serving
