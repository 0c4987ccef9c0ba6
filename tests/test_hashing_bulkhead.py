"""In process: which routes the bulkhead serves, and the 503 the app answers for a request the
worker sheds. Outside gunicorn nothing is ever shed (the test client never is: tests/test_auth.py
runs unchanged). The worker itself, on a real gunicorn: test_hashing_bulkhead_stack.py."""

from __future__ import annotations

import logging

import pytest
from apiflask import APIFlask

from service import hashing_bulkhead
from service.hashing_bulkhead import Shed, hashes_passwords


def test_the_hashing_routes_are_registration_and_login(app):
    assert hashing_bulkhead.routes(app) == {("POST", "/auth/register"), ("POST", "/auth/login")}


def test_a_hashing_route_must_have_a_fixed_path():
    app = APIFlask(__name__)

    @app.post("/users/<int:user_id>/password")
    @hashes_passwords
    def change_password(user_id):
        return {}

    with pytest.raises(RuntimeError, match="must have a fixed path"):
        hashing_bulkhead.routes(app)


def test_a_shed_request_is_answered_503_before_the_view(client, caplog):
    creds = {"email": "shed@example.com", "password": "correct horse battery"}
    with (
        caplog.at_level(logging.WARNING, logger="service.hashing"),
        hashing_bulkhead.shedding(Shed("queue_full", 0.0, 256, 7)),
    ):
        shed = client.post("/auth/register", json=creds, headers={"X-Request-ID": "shed-1"})
    assert shed.status_code == 503
    assert shed.headers["Retry-After"] == "7" and shed.headers["X-Request-ID"] == "shed-1"
    body = shed.get_json()
    assert len(body["error"].pop("trace_id")) == 32  # a new trace: the client sent none
    assert body == {
        "error": {
            "status": 503,
            "code": "auth_busy",
            "message": "Too many logins and registrations are waiting on this server; retry in 7 s",
            "details": {"reason": "queue_full", "retry_after": 7},
            "request_id": "shed-1",
        }
    }
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "hash_shed"]
    assert record.levelname == "WARNING" and record.reason == "queue_full" and record.queue_depth == 256
    # the view never ran: the email is free, and outside the block nothing is shed
    assert client.post("/auth/register", json=creds).status_code == 201


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
def test_the_503_is_in_the_openapi_document(client, path):
    responses = client.get("/openapi.json").get_json()["paths"][path]["post"]["responses"]
    assert "auth_busy" in responses["503"]["description"]
    assert responses["503"]["headers"]["Retry-After"]["required"] is True
