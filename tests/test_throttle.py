"""Login and registration limits (service/auth/throttle.py), in-process against the real
Postgres: the hostile cases first, then the off switch, the store failing, the address, the
table's size. Time never passes by itself here: the throttle's clock is a FakeClock the tests
move (the statements take it instead of the database's now()).

The same limits on a real gunicorn with three workers: test_throttle_stack.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from service.auth import throttle as throttle_module
from service.auth.passwords import Passwords
from service.auth.throttle import LOGIN_FAILURES, STORE_ERRORS, THROTTLED, Limits, client_address
from service.extensions import db

ATTACKER = {"REMOTE_ADDR": "127.0.0.1"}
OWNER = {"REMOTE_ADDR": "127.0.0.9"}  # the legitimate user, from another address
VICTIM = {"email": "victim@example.com", "password": "correct horse battery"}
WRONG = {"email": VICTIM["email"], "password": "not-the-password"}


class FakeClock:
    """Epoch seconds that move only when the test moves them."""

    def __init__(self, now: float = 2_000_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def throttled(make_app, clock, tmp_path):
    """An app with extra settings whose throttle runs on `clock`, its log in tmp_path/logs."""

    def _make(**extra):
        extra.setdefault("LOG_DIR", str(tmp_path / "logs"))
        extra.setdefault("LOG_CONSOLE", "0")
        app = make_app(**extra)
        app.extensions["throttle"].clock = clock
        return app

    return _make


@pytest.fixture
def verified(monkeypatch):
    """How many times argon2 verified a password (the original still runs)."""
    calls = []
    original = Passwords.verify

    def counting(self, password_hash, password):
        calls.append(password)
        return original(self, password_hash, password)

    monkeypatch.setattr(Passwords, "verify", counting)
    return calls


def post(client, path, body, address=ATTACKER, **kwargs):
    return client.post(path, json=body, environ_base=address, **kwargs)


def log_lines(tmp_path) -> list[dict]:
    for handler in logging.getLogger().handlers:
        handler.flush()
    path = tmp_path / "logs" / "app.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def throttled_count(route: str, reason: str) -> float:
    return THROTTLED.labels(route=route, reason=reason)._value.get()


def assert_429(response, reason: str, retry_after: int) -> dict:
    assert response.status_code == 429, (response.status_code, response.get_json())
    assert response.headers["Retry-After"] == str(retry_after)
    error = response.get_json()["error"]
    assert error["status"] == 429 and error["code"] == "too_many_requests"
    assert error["details"] == {"reason": reason, "retry_after": retry_after}
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert f"retry in {retry_after} s" in error["message"]
    return error


def counters(app) -> dict[str, int]:
    with app.app_context(), db.engine.connect() as conn:
        return dict(conn.execute(text("SELECT key, hits FROM throttle_counters")).all())


# --- brute force against one account ----------------------------------------------------------


def test_brute_force_on_one_account_is_delayed_without_verifying_and_the_owner_still_logs_in(
    throttled, clock, verified, tmp_path
):
    app = throttled(THROTTLE_ACCOUNT_DELAY_MAX_SECONDS="8")
    client = app.test_client()
    assert post(client, "/auth/register", VICTIM, OWNER).status_code == 201
    failures_before = LOGIN_FAILURES._value.get()
    refused_before = throttled_count("/auth/login", "account_delay")

    statuses = []
    while 429 not in statuses and len(statuses) < 50:
        statuses.append(post(client, "/auth/login", WRONG).status_code)
    print(f"first 429 at request {len(statuses)}: {statuses}")
    assert statuses == [401] * 5 + [429]  # THROTTLE_ACCOUNT_FREE_FAILURES=5, then 1 s
    assert len(verified) == 5

    # While refused, nothing is verified however many guesses arrive (and none counts as a failure).
    for _ in range(20):
        assert_429(post(client, "/auth/login", WRONG), "account_delay", 1)
    assert len(verified) == 5
    assert LOGIN_FAILURES._value.get() - failures_before == 5

    # The owner, from their own address, logs in meanwhile.
    assert post(client, "/auth/login", VICTIM, OWNER).status_code == 200

    # Each failure after the delay doubles it, up to the cap (8 s here; 15 min by default).
    limits = app.extensions["throttle"].limits
    seen = []
    for failures in range(6, 11):
        clock.advance(seen[-1] if seen else 1)
        assert post(client, "/auth/login", WRONG).status_code == 401
        refused = post(client, "/auth/login", WRONG)
        seen.append(int(refused.headers["Retry-After"]))
        assert seen[-1] == limits.delay_after(failures)
        assert_429(refused, "account_delay", seen[-1])
    assert seen == [2, 4, 8, 8, 8]
    assert len(verified) == 5 + 5 + 1  # the owner's login too
    # Part-way through a delay, Retry-After is what is left of it.
    clock.advance(5.5)
    assert_429(post(client, "/auth/login", VICTIM), "account_delay", 3)  # even the right password
    assert throttled_count("/auth/login", "account_delay") - refused_before == 20 + 1 + 5 + 1

    # One log line per refusal, with the request id and the address, never the email or a password.
    lines = log_lines(tmp_path)
    refusals = [line for line in lines if line.get("event") == "throttled"]
    assert len(refusals) == 27
    for line in refusals:
        assert (line["route"], line["reason"], line["remote_addr"], line["client"]) == (
            "/auth/login",
            "account_delay",
            "127.0.0.1",
            "127.0.0.1",
        )
        assert line["retry_after"] >= 1 and len(line["request_id"]) == 32
        assert line["level"] == "INFO"
    everything = (tmp_path / "logs" / "app.log").read_text()
    for secret in (VICTIM["password"], WRONG["password"], VICTIM["email"]):
        assert secret not in everything


def test_a_successful_login_resets_the_delay(throttled, clock, verified):
    client = throttled().test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    for _ in range(4):
        assert post(client, "/auth/login", WRONG).status_code == 401
    assert post(client, "/auth/login", VICTIM).status_code == 200
    # five more free failures, not one
    assert [post(client, "/auth/login", WRONG).status_code for _ in range(6)] == [401] * 5 + [429]


def test_the_delay_is_forgotten_a_reset_period_after_the_last_failure(throttled, clock):
    client = throttled(THROTTLE_ACCOUNT_RESET_SECONDS="3600", THROTTLE_ACCOUNT_DELAY_MAX_SECONDS="60").test_client()
    for _ in range(5):
        assert post(client, "/auth/login", WRONG).status_code == 401
    clock.advance(3599)
    assert post(client, "/auth/login", WRONG).status_code == 401  # the 6th: still remembered
    assert post(client, "/auth/login", WRONG).status_code == 429
    clock.advance(3600)
    assert [post(client, "/auth/login", WRONG).status_code for _ in range(6)] == [401] * 5 + [429]


def test_an_unknown_email_is_throttled_exactly_like_a_registered_one(throttled, clock):
    """A 429 must not tell an attacker which emails have accounts."""
    client = throttled().test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    unknown = {"email": "nobody@example.com", "password": WRONG["password"]}
    for body in (WRONG, unknown):
        answers = [post(client, "/auth/login", body) for _ in range(7)]
        assert [a.status_code for a in answers] == [401] * 5 + [429, 429]
        assert {a.headers["Retry-After"] for a in answers[5:]} == {"1"}


# --- per address --------------------------------------------------------------------------------


def test_failed_logins_across_accounts_are_capped_per_address(throttled, clock, verified):
    """Password spraying: one guess each on many accounts. Over the cap, every login from that
    address is refused without verifying anything, so a flood stops costing argon2 CPU."""
    client = throttled(THROTTLE_ADDRESS_FAILURES_LIMIT="10").test_client()
    assert post(client, "/auth/register", VICTIM, OWNER).status_code == 201
    for i in range(10):
        assert (
            post(client, "/auth/login", {"email": f"user{i}@example.com", "password": "Summer2026!"}).status_code == 401
        )
    assert len(verified) == 10
    assert_429(
        post(client, "/auth/login", {"email": "user99@example.com", "password": "x" * 8}), "address_failures", 300
    )
    clock.advance(100)
    assert_429(post(client, "/auth/login", VICTIM), "address_failures", 200)
    assert len(verified) == 10
    assert post(client, "/auth/login", VICTIM, OWNER).status_code == 200  # another address is not affected
    clock.advance(200)  # the window is over
    assert post(client, "/auth/login", VICTIM).status_code == 200


def test_logins_per_address_are_limited_even_when_they_succeed(throttled, clock):
    client = throttled(THROTTLE_LOGIN_LIMIT="3", THROTTLE_LOGIN_WINDOW_SECONDS="60").test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    before = throttled_count("/auth/login", "login_rate")
    assert [post(client, "/auth/login", VICTIM).status_code for _ in range(3)] == [200] * 3
    clock.advance(59.2)
    assert_429(post(client, "/auth/login", VICTIM), "login_rate", 1)
    assert throttled_count("/auth/login", "login_rate") - before == 1
    clock.advance(0.8)  # a new window
    assert post(client, "/auth/login", VICTIM).status_code == 200


def test_a_register_flood_from_one_address_is_limited(throttled, clock, make_app):
    app = throttled(THROTTLE_REGISTER_LIMIT="5", THROTTLE_REGISTER_WINDOW_SECONDS="60")
    client = app.test_client()
    before = throttled_count("/auth/register", "register_rate")
    statuses = [
        post(client, "/auth/register", {"email": f"farm{i}@example.com", "password": "secret"}).status_code
        for i in range(8)
    ]
    assert statuses == [201] * 5 + [429] * 3
    clock.advance(20)
    error = assert_429(
        post(client, "/auth/register", {"email": "farm9@example.com", "password": "secret"}), "register_rate", 40
    )
    assert error["message"] == "Too many registrations from this address; retry in 40 s"
    assert throttled_count("/auth/register", "register_rate") - before == 4
    with app.app_context(), db.engine.connect() as conn:  # a refused registration writes no user
        assert conn.execute(text("SELECT count(*) FROM users")).scalar() == 5
    # another address registers; after the window this one does again
    assert (
        post(client, "/auth/register", {"email": "other@example.com", "password": "secret"}, OWNER).status_code == 201
    )
    clock.advance(40)
    assert post(client, "/auth/register", {"email": "farm10@example.com", "password": "secret"}).status_code == 201


def test_invalid_bodies_are_refused_before_the_limits_count_them(throttled):
    """A 422 costs no argon2 work, so it does not use up the address's registrations."""
    app = throttled(THROTTLE_REGISTER_LIMIT="1")
    client = app.test_client()
    for _ in range(3):
        assert post(client, "/auth/register", {"email": "not-an-email", "password": "secret"}).status_code == 422
    assert counters(app) == {}
    assert post(client, "/auth/register", VICTIM).status_code == 201


# --- the client address -------------------------------------------------------------------------


def test_a_client_set_x_forwarded_for_does_not_change_the_address(throttled, tmp_path):
    """TRUSTED_PROXIES=0 (the default): the header is a client's, so it is ignored."""
    app = throttled(THROTTLE_REGISTER_LIMIT="2")
    client = app.test_client()
    answers = [
        client.post(
            "/auth/register",
            json={"email": f"spoof{i}@example.com", "password": "secret"},
            headers={"X-Forwarded-For": f"203.0.113.{i}"},
        )
        for i in range(4)
    ]
    assert [a.status_code for a in answers] == [201, 201, 429, 429]
    assert counters(app) == {"register|127.0.0.1": 4}
    refusals = [line for line in log_lines(tmp_path) if line.get("event") == "throttled"]
    assert {(line["client"], line["remote_addr"]) for line in refusals} == {("127.0.0.1", "127.0.0.1")}


def test_behind_a_trusted_proxy_the_forwarded_address_is_counted(throttled):
    """TRUSTED_PROXIES=1 (nginx in front): the address nginx appends is the client's."""
    app = throttled(THROTTLE_REGISTER_LIMIT="1", TRUSTED_PROXIES="1")
    client = app.test_client()
    for i in range(2):
        response = client.post(
            "/auth/register",
            json={"email": f"proxied{i}@example.com", "password": "secret"},
            headers={"X-Forwarded-For": f"198.51.100.{i}"},
        )
        assert response.status_code == 201
    assert counters(app) == {"register|198.51.100.0": 1, "register|198.51.100.1": 1}


@pytest.mark.parametrize(
    "remote_addr, counted_as",
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:1:2:3", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
    ],
)
def test_ipv6_clients_are_counted_per_64(remote_addr, counted_as):
    assert client_address(remote_addr) == counted_as


def test_an_address_that_is_not_one_is_hashed_to_a_bounded_key():
    key = client_address("x" * 10_000)
    assert key.startswith("other:") and len(key) == len("other:") + 32


def test_ipv6_addresses_of_one_64_share_a_limit(throttled):
    client = throttled(THROTTLE_REGISTER_LIMIT="1").test_client()
    first = post(client, "/auth/register", VICTIM, {"REMOTE_ADDR": "2001:db8::1"})
    second = post(
        client, "/auth/register", {"email": "b@example.com", "password": "secret"}, {"REMOTE_ADDR": "2001:db8::2"}
    )
    assert (first.status_code, second.status_code) == (201, 429)


# --- what is stored -----------------------------------------------------------------------------


def test_the_table_holds_no_email_and_stays_small(throttled, clock):
    app = throttled()
    client = app.test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    assert post(client, "/auth/login", WRONG).status_code == 401
    keys = set(counters(app))
    assert {k.split("|")[0] for k in keys} == {"register", "login", "failures", "account"}
    assert not any("victim" in k or "@" in k for k in keys)
    (account_key,) = [k for k in keys if k.startswith("account|")]
    assert account_key == f"account|{app.extensions['throttle'].account_hash(VICTIM['email'])}|127.0.0.1"

    throttle = app.extensions["throttle"]

    def sweep():
        with app.app_context():
            return throttle.sweep()

    assert sweep() == 0  # nothing has expired
    clock.advance(301)  # the register and login windows (60 s) and the failures window (300 s)
    assert sweep() == 3
    assert set(counters(app)) == {account_key}  # failures are remembered for a day
    clock.advance(86400)
    assert sweep() == 1
    assert counters(app) == {}


def test_an_expired_window_is_restarted_by_the_upsert_itself(throttled, clock):
    app = throttled(THROTTLE_REGISTER_LIMIT="1")
    client = app.test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    clock.advance(60)
    assert post(client, "/auth/register", {"email": "b@example.com", "password": "secret"}).status_code == 201
    assert counters(app) == {"register|127.0.0.1": 1}  # the same row, restarted at 1


# --- the store failing --------------------------------------------------------------------------


@pytest.fixture
def locked_table(database_uri):
    """The throttle table locked by another session, as a migration or a stuck job would."""
    engine = create_engine(database_uri)
    conn = engine.connect()
    transaction = conn.begin()
    conn.execute(text("LOCK TABLE throttle_counters IN ACCESS EXCLUSIVE MODE"))
    yield
    transaction.rollback()
    conn.close()
    engine.dispose()


def test_when_the_store_is_locked_logins_and_registrations_fail_open_fast(throttled, tmp_path, request):
    app = throttled(THROTTLE_STORE_TIMEOUT_MS="250")
    client = app.test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    errors_before = STORE_ERRORS._value.get()
    request.getfixturevalue("locked_table")

    started = time.perf_counter()
    login = post(client, "/auth/login", VICTIM)
    elapsed = time.perf_counter() - started
    assert login.status_code == 200, login.get_json()
    # One deadline (250 ms), not DB_STATEMENT_TIMEOUT_MS (10 s): generous for a loaded machine.
    assert elapsed < 5, elapsed
    print(f"login with the throttle table locked: {elapsed * 1000:.0f} ms")
    # A failed login makes one throttle statement too: after a store error it makes no other.
    assert [post(client, "/auth/login", WRONG).status_code for _ in range(7)] == [401] * 7
    assert post(client, "/auth/register", {"email": "b@example.com", "password": "secret"}).status_code == 201
    assert STORE_ERRORS._value.get() - errors_before == 1 + 7 + 1

    warnings = [line for line in log_lines(tmp_path) if line.get("event") == "throttle_store_error"]
    assert len(warnings) == 1, warnings  # one line per process and minute
    (warning,) = warnings
    assert warning["level"] == "WARNING" and warning["operation"] == "login_check"
    assert warning["error"] in ("LockNotAvailable", "QueryCanceled")
    assert warning["request_id"] == login.headers["X-Request-ID"]
    assert VICTIM["password"] not in json.dumps(warnings)


def test_the_next_warning_says_how_many_failures_were_not_logged(throttled, tmp_path, monkeypatch):
    monkeypatch.setattr(throttle_module, "WARNING_INTERVAL", 0.0)
    app = throttled(THROTTLE_STORE_TIMEOUT_MS="50")
    throttle = app.extensions["throttle"]
    throttle._warned_at = time.monotonic() + 3600  # as if a line had just been written
    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    with engine.connect() as conn, conn.begin():
        conn.execute(text("LOCK TABLE throttle_counters IN ACCESS EXCLUSIVE MODE"))
        client = app.test_client()
        assert post(client, "/auth/register", VICTIM).status_code == 201
        assert post(client, "/auth/register", {"email": "b@example.com", "password": "secret"}).status_code == 201
        throttle._warned_at = None
        assert post(client, "/auth/register", {"email": "c@example.com", "password": "secret"}).status_code == 201
    engine.dispose()
    (warning,) = [line for line in log_lines(tmp_path) if line.get("event") == "throttle_store_error"]
    assert warning["unlogged_since_last"] == 2


def test_a_broken_store_fails_open_too(throttled, tmp_path):
    """Not a lock but an error (here: the table is gone, as before `flask db upgrade`)."""
    app = throttled()
    client = app.test_client()
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE throttle_counters RENAME TO throttle_counters_away"))
    try:
        assert post(client, "/auth/register", VICTIM).status_code == 201
        assert post(client, "/auth/login", VICTIM).status_code == 200
    finally:
        with app.app_context(), db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE throttle_counters_away RENAME TO throttle_counters"))
    (warning,) = [line for line in log_lines(tmp_path) if line.get("event") == "throttle_store_error"]
    assert warning["error"] == "UndefinedTable"


def test_the_deadline_is_local_to_the_throttle_statement(throttled, database_uri):
    """The connection goes back to the pool with the session's statement timeout, not 250 ms."""
    app = throttled(DB_POOL_SIZE="1")
    client = app.test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    with app.app_context(), db.engine.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "10s"
        assert conn.execute(text("SHOW lock_timeout")).scalar() == "0"


# --- concurrency, the off switch, the spec ------------------------------------------------------


def test_concurrent_registrations_take_exactly_the_limit(throttled):
    """However many requests race for the last slots, the UPSERT hands out exactly the limit."""
    app = throttled(THROTTLE_REGISTER_LIMIT="10", DB_POOL_SIZE="8")
    statuses = []
    lock = threading.Lock()

    def register(i):
        response = post(app.test_client(), "/auth/register", {"email": f"race{i}@example.com", "password": "secret"})
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201] * 10 + [429] * 20


def test_concurrent_guesses_on_one_account_get_exactly_the_free_failures(throttled, verified):
    """An attempt is counted for its (account, address) pair before the password is checked, so
    guesses sent all at once cannot slip past the delay while the first ones are being verified."""
    app = throttled(DB_POOL_SIZE="8")
    assert post(app.test_client(), "/auth/register", VICTIM, OWNER).status_code == 201
    statuses = []
    lock = threading.Lock()
    start = threading.Barrier(24)

    def guess():
        client = app.test_client()
        start.wait()
        response = post(client, "/auth/login", WRONG)
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=guess) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [401] * 5 + [429] * 19
    assert len(verified) == 5
    assert post(app.test_client(), "/auth/login", VICTIM, OWNER).status_code == 200


def test_the_off_switch(throttled, verified):
    app = throttled(THROTTLE_ENABLED="0")
    client = app.test_client()
    assert post(client, "/auth/register", VICTIM).status_code == 201
    failures_before = LOGIN_FAILURES._value.get()
    assert [post(client, "/auth/login", WRONG).status_code for _ in range(12)] == [401] * 12
    assert len(verified) == 12
    assert LOGIN_FAILURES._value.get() - failures_before == 12  # failures are counted anyway
    assert counters(app) == {}


def test_the_spec_documents_the_429_with_retry_after(app):
    paths = app.test_client().get("/openapi.json").get_json()["paths"]
    for path in ("/auth/login", "/auth/register"):
        answer = paths[path]["post"]["responses"]["429"]
        assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/HTTPError"}
        assert answer["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}


def test_every_refusal_series_exists_before_the_first_refusal(app):
    labels = {tuple(sample.labels.values()) for family in THROTTLED.collect() for sample in family.samples}
    assert set(throttle_module.DECISIONS) <= {labels_[:2] for labels_ in labels}


def test_delays_double_from_the_free_failures_on_up_to_the_cap():
    limits = Limits(
        register_limit=1,
        register_window=60,
        login_limit=1,
        login_window=60,
        failures_limit=1,
        failures_window=300,
        free_failures=5,
        delay=1,
        delay_max=900,
        reset=86400,
        store_timeout_ms=250,
    )
    assert [limits.delay_after(n) for n in range(1, 17)] == [None] * 4 + [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        512,
        900,
        900,
    ]
    assert limits.delay_after(10**9) == 900
