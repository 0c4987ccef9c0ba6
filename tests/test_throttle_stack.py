"""The login and registration limits on the real stack: gunicorn with three workers (the
shipped config, production mode, the default argon2 cost), its JSON log file and the master's
merged metrics. Clients come from different loopback addresses (a socket bound to 127.0.0.x),
as different hosts would; gunicorn sees them in `remote_addr`.

The in-process cases, with an injected clock: test_throttle.py.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import create_engine, text

from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.scrape import metric, scrape

pytestmark = pytest.mark.stack

WORKERS = 3
REGISTER_LIMIT = 30
ATTACKER, OWNER, FARMER, LOCKED_OUT, SWARM = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"


class SourceAddress(HTTPAdapter):
    """Connections from one local address (the loopback has all of 127/8)."""

    def __init__(self, address: str, **kwargs) -> None:
        self.address = address
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        return super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    session = requests.Session()
    adapter = SourceAddress(address)
    session.mount("http://", adapter)
    return session


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("throttle")
    env = stack_env(
        migrated_database("test_throttle_stack"),
        workdir,
        # a window no run outlasts, so the count of accepted registrations is exact
        THROTTLE_REGISTER_LIMIT=str(REGISTER_LIMIT),
        THROTTLE_REGISTER_WINDOW_SECONDS="3600",
        # a loaded 2-core box must not fail open by accident (the deadline is tested below)
        THROTTLE_STORE_TIMEOUT_MS="1000",
    )
    with Gunicorn(env, workers=WORKERS, log_path=workdir / "gunicorn.out") as server:
        server.wait_for_workers()
        server.log_dir = workdir / "logs"
        server.db_uri = env["DB_URI"]
        yield server


def log_lines(stack) -> list[dict]:
    return [json.loads(line) for path in stack.log_dir.glob("app.log*") for line in path.read_text().splitlines()]


def throttled(samples, reason: str) -> float:
    route = "/auth/register" if reason == "register_rate" else "/auth/login"
    return metric(samples, "flaskapi_throttled_total", route=route, reason=reason)


def test_brute_force_on_one_account_from_one_address(stack):
    owner, attacker = session_from(OWNER), session_from(ATTACKER)
    victim = {"email": f"victim-{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse battery"}
    wrong = {**victim, "password": "not-the-password"}
    assert owner.post(stack.url + "/auth/register", json=victim, timeout=30).status_code == 201
    before = scrape(stack.metrics_url)

    answers = []
    while not answers or answers[-1].status_code != 429:
        assert len(answers) < 50, [a.status_code for a in answers]
        answers.append(attacker.post(stack.url + "/auth/login", json=wrong, timeout=30))
    print(f"first 429 at request {len(answers)}")
    assert [a.status_code for a in answers] == [401] * 5 + [429]
    first = answers[-1]
    assert first.headers["Retry-After"] == "1"
    assert first.json()["error"]["details"] == {"reason": "account_delay", "retry_after": 1}
    refused = [first] + [attacker.post(stack.url + "/auth/login", json=wrong, timeout=30) for _ in range(10)]
    assert {(r.status_code, r.json()["error"]["details"]["reason"]) for r in refused} == {(429, "account_delay")}

    # The owner, from another address, logs in while the attacker is refused.
    assert owner.post(stack.url + "/auth/login", json=victim, timeout=30).status_code == 200

    # Once the second is over, one more wrong guess doubles the delay (polling: every refused
    # try costs the server one round trip and counts as nothing).
    def one_more_failure():
        response = attacker.post(stack.url + "/auth/login", json=wrong, timeout=30)
        if response.status_code == 429:
            refused.append(response)
        return response.status_code == 401

    wait_for(one_more_failure, "the 1 s delay to end", interval=0.2)
    doubled = attacker.post(stack.url + "/auth/login", json=wrong, timeout=30)
    assert doubled.status_code == 429 and doubled.headers["Retry-After"] == "2"
    refused.append(doubled)

    after = scrape(stack.metrics_url)
    assert throttled(after, "account_delay") - throttled(before, "account_delay") == len(refused)
    assert metric(after, "flaskapi_login_failures_total") - metric(before, "flaskapi_login_failures_total") == 6

    # Every login asked the store once (the five 401s, every 429, the poll's 401 and the
    # owner's login); only the owner's success undid its count.
    def statements(samples, operation):
        return metric(samples, "flaskapi_throttle_store_seconds_count", operation=operation)

    assert statements(after, "login_check") - statements(before, "login_check") == len(answers) + len(refused) + 1
    assert statements(after, "login_success") - statements(before, "login_success") == 1

    lines = log_lines(stack)
    ids = {r.headers["X-Request-ID"] for r in refused}
    refusals = [line for line in lines if line.get("event") == "throttled" and line.get("request_id") in ids]
    assert len(refusals) == len(refused)
    for line in refusals:
        assert (line["route"], line["reason"], line["remote_addr"], line["level"]) == (
            "/auth/login",
            "account_delay",
            ATTACKER,
            "INFO",
        )
        assert line["retry_after"] in (1, 2)
    # Refused logins verify nothing: their server time is a round trip, not an argon2 hash.
    access = {line["request_id"]: line for line in lines if line.get("event") == "access"}
    refused_ms = [access[r.headers["X-Request-ID"]]["duration_ms"] for r in refused]
    failed_ms = [access[a.headers["X-Request-ID"]]["duration_ms"] for a in answers[:5]]
    print(f"server time: 401 median {statistics.median(failed_ms):.1f} ms, 429 {statistics.median(refused_ms):.1f} ms")
    assert statistics.median(refused_ms) < statistics.median(failed_ms)
    everything = "".join(path.read_text() for path in stack.log_dir.glob("app.log*")) + stack.output()
    for secret in (victim["password"], wrong["password"], victim["email"]):
        assert secret not in everything


def test_concurrent_guesses_across_the_workers_get_exactly_the_free_failures(stack):
    """Guesses sent at once, spread over the three workers, cannot slip past the delay while the
    first ones are being verified: each is counted for its pair before its password is checked."""
    victim = {"email": f"swarmed-{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse battery"}
    with session_from(OWNER) as owner:
        assert owner.post(stack.url + "/auth/register", json=victim, timeout=30).status_code == 201

    def guess(_) -> int:
        with session_from(SWARM) as session:
            return session.post(
                stack.url + "/auth/login",
                json={**victim, "password": "not-the-password"},
                headers={"Connection": "close"},
                timeout=60,
            ).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = sorted(pool.map(guess, range(36)))
    assert statuses == [401] * 5 + [429] * 31


def test_a_register_flood_gets_exactly_the_limit_across_the_workers(stack):
    before = scrape(stack.metrics_url)
    tag = uuid.uuid4().hex[:8]

    def register(i: int) -> requests.Response:
        # a new connection per request (Connection: close), so they spread over the workers
        with session_from(FARMER) as session:
            return session.post(
                stack.url + "/auth/register",
                json={"email": f"farm-{tag}-{i}@example.com", "password": "farm-password"},
                headers={"Connection": "close"},
                timeout=60,
            )

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(register, range(2 * REGISTER_LIMIT)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] * REGISTER_LIMIT + [429] * REGISTER_LIMIT
    for answer in answers:
        if answer.status_code == 429:
            retry = int(answer.headers["Retry-After"])
            assert 1 <= retry <= 3600
            assert answer.json()["error"]["details"] == {"reason": "register_rate", "retry_after": retry}
    after = scrape(stack.metrics_url)
    assert throttled(after, "register_rate") - throttled(before, "register_rate") == REGISTER_LIMIT

    engine = create_engine(stack.db_uri)
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM users WHERE email LIKE :p"), {"p": f"farm-{tag}-%"})
            assert stored.scalar() == REGISTER_LIMIT
    finally:
        engine.dispose()
    # Which workers accepted them: the limit held however they spread.
    ids = {a.headers["X-Request-ID"] for a in answers if a.status_code == 201}
    pids = {line["pid"] for line in log_lines(stack) if line.get("event") == "access" and line["request_id"] in ids}
    print(f"{REGISTER_LIMIT} registrations accepted by {len(pids)} workers")
    assert len(pids) >= 2, "all on one worker: the test proved nothing about sharing"
    # another address still registers
    with session_from(OWNER) as other:
        response = other.post(
            stack.url + "/auth/register", json={"email": f"other-{tag}@example.com", "password": "x" * 8}, timeout=30
        )
    assert response.status_code == 201


def test_logins_fail_open_fast_when_the_throttle_table_is_locked(stack):
    client = session_from(LOCKED_OUT)
    creds = {"email": f"locked-{uuid.uuid4().hex[:8]}@example.com", "password": "locked-password"}
    assert client.post(stack.url + "/auth/register", json=creds, timeout=30).status_code == 201
    before = scrape(stack.metrics_url)
    engine = create_engine(stack.db_uri)
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("LOCK TABLE throttle_counters IN ACCESS EXCLUSIVE MODE"))
            started = time.perf_counter()
            login = client.post(stack.url + "/auth/login", json=creds, timeout=30)
            elapsed = time.perf_counter() - started
            registered = client.post(
                stack.url + "/auth/register", json={**creds, "email": "2" + creds["email"]}, timeout=30
            )
    finally:
        engine.dispose()
    print(f"login with the throttle table locked: {elapsed * 1000:.0f} ms")
    assert login.status_code == 200, login.text
    assert registered.status_code == 201, registered.text
    # the 1 s deadline of the stack, not DB_STATEMENT_TIMEOUT_MS (10 s)
    assert elapsed < 6, elapsed
    after = scrape(stack.metrics_url)
    errors = metric(after, "flaskapi_throttle_store_errors_total") - metric(
        before, "flaskapi_throttle_store_errors_total"
    )
    assert errors == 2
    warnings = [line for line in log_lines(stack) if line.get("event") == "throttle_store_error"]
    assert warnings and all(w["level"] == "WARNING" for w in warnings)
    # the first failure of a worker in this run: its line is written (later ones of the minute are not)
    assert login.headers["X-Request-ID"] in {w["request_id"] for w in warnings}
    # and the limits are back once the lock is gone
    assert client.post(stack.url + "/auth/login", json=creds, timeout=30).status_code == 200
    after_lock = scrape(stack.metrics_url)
    assert metric(after_lock, "flaskapi_throttle_store_errors_total") == metric(
        after, "flaskapi_throttle_store_errors_total"
    )
