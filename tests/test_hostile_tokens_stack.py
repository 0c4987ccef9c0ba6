"""Hostile tokens against the real stack: a production-mode gunicorn with three workers, sent
over loopback tokens signed with its own key that break the claim policy (service/auth/tokens.py).
Each is 401 `token_invalid` in the one error shape, and none reaches the database or leaves a
traceback in the logs. Also: production refuses to start with a long but low-entropy key."""

from __future__ import annotations

import json
import os
import time
import uuid

import jwt
import pytest
import requests

from bench.harness.commands import run_command
from bench.harness.environment import free_port, stack_env
from bench.harness.gunicorn import CONFIG, GUNICORN, Gunicorn
from bench.harness.polling import wait_for
from bench.harness.scrape import metric, scrape

pytestmark = pytest.mark.stack

WORKERS = 3
ISSUER = "flaskapi-observability"  # JWT_ISSUER's default
AUDIENCE = "flaskapi-observability-api"  # JWT_AUDIENCE's default
THIRTY_NINES = "9" * 30
ERROR_KEYS = {"status", "code", "message", "details", "request_id", "trace_id"}


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tokens")
    # LOG_CONSOLE on (the default): the JSON lines also go to gunicorn's output, as under systemd
    env = stack_env(migrated_database("test_tokens_stack"), data_dir)
    with Gunicorn(env, workers=WORKERS, log_path=data_dir / "gunicorn.out") as stack:
        wait_for(
            lambda: metric(scrape(stack.metrics_url), "flaskapi_workers_alive") == WORKERS,
            f"{WORKERS} workers alive",
        )
        stack.key = env["JWT_SECRET_KEY"]  # the real key: the forgeries below need nothing else
        stack.log_dir = data_dir / "logs"
        yield stack


@pytest.fixture(scope="module")
def user(stack) -> dict:
    """A registered user: its id and the token the service issued at login."""
    creds = {"email": f"tokens-{uuid.uuid4().hex[:8]}@example.com", "password": "tokens-password"}
    registered = requests.post(stack.url + "/auth/register", json=creds, timeout=10)
    assert registered.status_code == 201, registered.text
    token = requests.post(stack.url + "/auth/login", json=creds, timeout=10).json()["token"]
    return {"id": registered.json()["id"], "token": token}


def forge(stack, sub: str, *, drop=(), **claims) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE, **claims}
    for name in drop:
        payload.pop(name)
    return jwt.encode(payload, stack.key, algorithm="HS256")


def create_book(stack, token: str, request_id: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", "X-Request-ID": request_id or uuid.uuid4().hex}
    return requests.post(stack.url + "/books/", json={"title": "Hostile"}, headers=headers, timeout=10)


def assert_token_invalid(response: requests.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    error = body["error"]
    assert (error["status"], error["code"], error["message"]) == (401, "token_invalid", "The token is invalid")
    assert error["details"] == {} and error["request_id"] == response.headers["X-Request-ID"]


def log_lines(stack) -> list[dict]:
    lines = []
    for path in sorted(stack.log_dir.glob("app.log*")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return lines


def test_the_service_issued_token_and_a_faithful_forgery_are_accepted(stack, user):
    """The controls: the refusals below are the policy's, not a broken key or stack."""
    assert create_book(stack, user["token"]).status_code == 201
    accepted = create_book(stack, forge(stack, str(user["id"])))
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["owner_id"] == user["id"]


@pytest.mark.parametrize(
    "case",
    [
        {"drop": ("exp",)},  # was accepted: valid forever
        {"drop": ("iat",)},
        {"drop": ("sub",)},
        {"drop": ("iss",)},  # was accepted
        {"drop": ("aud",)},  # was accepted
        {"sub": " 1"},  # was user 1
        {"sub": "\u0661"},  # ARABIC-INDIC DIGIT ONE: was user 1
        {"sub": "1_0"},  # was user 10
        {"sub": THIRTY_NINES},  # was a 500 with the SQL and its parameters in the ERROR line
    ],
    ids=["no-exp", "no-iat", "no-sub", "no-iss", "no-aud", "space-1", "arabic-indic-1", "1_0", "thirty-9s"],
)
def test_a_hostile_token_is_401_token_invalid(stack, user, case):
    case = dict(case)
    sub = case.pop("sub", str(user["id"]))
    assert_token_invalid(create_book(stack, forge(stack, sub, **case)))


def test_thirty_nines_leave_only_an_access_line(stack, user):
    request_id = f"thirty-nines-{uuid.uuid4().hex[:8]}"
    assert_token_invalid(create_book(stack, forge(stack, THIRTY_NINES), request_id))
    [access] = wait_for(
        lambda: [line for line in log_lines(stack) if line.get("request_id") == request_id],
        "the request's access line",
    )
    assert (access["event"], access["status"], access["level"], access["user_id"]) == ("access", 401, "INFO", None)
    everything = stack.output() + "".join(path.read_text() for path in stack.log_dir.glob("app.log*"))
    assert "{" in everything and request_id in everything  # the logs were read
    for absent in ("Traceback", "[SQL:", "INSERT INTO", "NumericValueOutOfRange", THIRTY_NINES):
        assert absent not in everything
    assert not [line for line in log_lines(stack) if line["level"] == "ERROR"]


def test_production_refuses_a_low_entropy_key_with_one_line(migrated_database, tmp_path):
    """32 bytes of one letter passed the length check and started; now gunicorn exits with the
    reason in one line, before serving anything."""
    port = free_port()
    metrics_dir = tmp_path / "metrics"  # empty, as a launcher must provide
    metrics_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FLASK_APP", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(
        stack_env(migrated_database("test_tokens_weak_key"), tmp_path),
        JWT_SECRET_KEY="a" * 32,
        BIND=f"127.0.0.1:{port}",
        METRICS_BIND=f"127.0.0.1:{free_port()}",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        WEB_CONCURRENCY="1",
    )
    result = run_command([str(GUNICORN), "-c", str(CONFIG)], env, timeout=60)
    assert result.returncode != 0, result.stdout
    [line] = [line for line in result.stdout.splitlines() if "JWT_SECRET_KEY" in line]
    assert "configuration error: JWT_SECRET_KEY looks guessable" in line, line
    assert "a" * 32 not in result.stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
