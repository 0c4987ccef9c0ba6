"""Brute-force and abuse limits on /auth/login and /auth/register, shared by every worker
process and every app host.

What is limited (the settings and their defaults: service/settings.py, docs/api.md#login-and-registration-limits):

- **per account and client address**, consecutive failed logins, as the OWASP Authentication
  Cheat Sheet's login throttling describes: after THROTTLE_ACCOUNT_FREE_FAILURES (5) the pair is
  refused for THROTTLE_ACCOUNT_DELAY_SECONDS (1 s), doubling with every further failure up to
  THROTTLE_ACCOUNT_DELAY_MAX_SECONDS (15 min); a successful login resets it, and failures are
  forgotten THROTTLE_ACCOUNT_RESET_SECONDS (1 day) after the last one. While refused, the password
  is not verified: 429 at once, no argon2 work. Unknown emails count exactly like known ones, so
  a 429 says nothing about which accounts exist.
- **per client address**: logins and registrations per fixed window, and failed logins across
  all accounts per window (password spraying; and once over it, every further login from that
  address is refused without argon2 work, so a login flood stops costing CPU).

A login is counted as a failure before its password is checked, and a success takes the count
back: row locks then serialise the attempts on one (account, address) pair, so guesses sent all
at once, through any workers and hosts, get exactly THROTTLE_ACCOUNT_FREE_FAILURES through
before the first delay, and one per delay after it (counting after the outcome let 12 of 16
concurrent guesses through, measured). It also makes the attack path the cheap one: a failed or
refused login costs one round trip, a successful one two.

Why the account delay is keyed on (account, address) and there is no account-wide lockout: a
delay on the account alone would let anyone lock its owner out by sending wrong passwords for
it, from anywhere, for as long as they like (OWASP warns of exactly this denial of service). Keyed
on the pair, an attacker only slows themselves; the real user, from their own address, logs in.
What an attacker with many addresses can still do is bounded by the per-address failure cap
times the addresses they hold, and shows up at once in flaskapi_login_failures_total (alert
FlaskapiFailedLoginSpike). IPv6 clients are counted per /64, the block one subscriber gets.

The store is the Postgres the service already uses (table throttle_counters, migration 0002):

- it is already shared by every worker and every app host, so a limit is one limit however the
  requests spread (per-process memory would let 3 workers x N hosts each grant the full limit);
- each decision is one round trip: an atomic `INSERT ... ON CONFLICT DO UPDATE ... RETURNING`
  that counts the hit, restarts an expired window and returns the count and the seconds left,
  so concurrent requests on any host can never both take the last slot (for a login, three such
  upserts chained in one statement: the plpgsql function throttle_login_check of the migration,
  whose plan Postgres keeps per session; planned on every call it cost 0.8 ms, 0.3 ms so);
- it is transactional and has one clock (the database's `now()`), so hosts with drifting clocks
  agree on when a window ends;
- there is no new moving part to install, secure, monitor or fail over, and `make run` and the
  tests already start a real Postgres, so the limits are tested as they run in production.

Flask-Limiter, the usual Flask answer, counts in process memory unless given Redis, Memcached
or MongoDB; shared limits would mean running (and failing over) one of those next to Postgres.
Measured (`python -m bench.throttle_cost`): +0.5 ms a registration or a failed login (one round
trip), +1.0 ms a successful login (two), next to the ~22 ms of one argon2 hash at the shipped
cost.

The table stays small: a row is a running window or delay; a row past its `expires_at` counts as
absent (the next hit restarts it in the same UPSERT), and each process deletes expired rows in
batches about once a minute (`sweep`); a successful login deletes its pair's row at once. Its
size is bounded by the addresses active in the last window plus the (account, address) pairs
with a failure in the last THROTTLE_ACCOUNT_RESET_SECONDS.

When the store fails or is slow (a lock held on the table, the database down or overloaded),
the request is served without the limits (fail open): every throttle statement runs with its
own lock_timeout and statement_timeout of THROTTLE_STORE_TIMEOUT_MS, set with `set_config(...,
is_local => true)` in front of the statement in the same round trip (the multi-statement string
is one implicit transaction, so the settings end with it). Measured on a bare connection: +10-25
us a statement, against +35-45 us for a SQL function with a SET clause, which bounds only lock
waits (a statement_timeout set inside a function does not apply to the statement running it).
A logged table took 380 us an upsert against 175 us unlogged: the commit's WAL flush. A failure
is counted in flaskapi_throttle_store_errors_total and logged as one WARNING line per process
and minute (the next line says how many were not logged). After one failure a request makes no
further throttle statement, so it waits at most one deadline. A pool with no free connection is not a store
failure: that answers 503 as everywhere else (errors.py).

The client address is `request.remote_addr`, which behind nginx is the client's only with
TRUSTED_PROXIES set (ProxyFix, in the factory); a header a client sets is never read here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable

from flask import Flask, current_app, request
from prometheus_client import Counter, Histogram
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from service.errors import APIError
from service.extensions import db

log = logging.getLogger(__name__)

REGISTER = "/auth/register"
LOGIN = "/auth/login"
# Every (route, reason) a refusal can have: the label set of flaskapi_throttled_total is fixed.
DECISIONS = (
    (REGISTER, "register_rate"),
    (LOGIN, "login_rate"),
    (LOGIN, "address_failures"),
    (LOGIN, "account_delay"),
)
REASONS = tuple(reason for _, reason in DECISIONS)
MESSAGES = {
    "register_rate": "Too many registrations from this address",
    "login_rate": "Too many logins from this address",
    "address_failures": "Too many failed logins from this address",
    "account_delay": "Too many failed logins for this account from this address",
}

WARNING_INTERVAL = 60.0  # seconds between two store-failure WARNING lines of one process
SWEEP_INTERVAL = 60.0  # seconds between two deletions of expired rows by one process (jittered)
SWEEP_BATCH = 5000  # rows deleted at most by one sweep, so a sweep stays within the deadline
MAX_DOUBLINGS = 40  # keeps 2 ** n finite in SQL; the cap is reached long before

# registry=None: see service/observability/metrics.py.
THROTTLED = Counter(
    "flaskapi_throttled_total",
    "Requests refused with 429 by the login and registration limits",
    ["route", "reason"],
    registry=None,
)
LOGIN_FAILURES = Counter(
    "flaskapi_login_failures_total",
    "Logins answered 401 (wrong password or unknown email)",
    registry=None,
)
# What the limits cost a request, under load as well as idle: a statement's time including the
# wait for a pooled connection. `operation` is one of OPERATIONS (a fixed label set).
OPERATIONS = ("register", "login_check", "login_success", "sweep")
STORE_SECONDS = Histogram(
    "flaskapi_throttle_store_seconds",
    "Time of one throttle statement, connection checkout included",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=None,
)
STORE_ERRORS = Counter(
    "flaskapi_throttle_store_errors_total",
    "Throttle statements that failed or passed THROTTLE_STORE_TIMEOUT_MS (the request was served without the limits)",
    registry=None,
)

# Every statement is one round trip: first the deadline (set_config(..., true) is SET LOCAL:
# it ends with the implicit transaction of the multi-statement string), then the work. `now`
# is epoch seconds, or NULL for the database's clock (only tests replace it).

# A hit on a fixed window: the count and the seconds until the window ends.
_HIT = text(
    """
SELECT set_config('lock_timeout', :deadline, true), set_config('statement_timeout', :deadline, true);
WITH clock AS (SELECT COALESCE(to_timestamp(CAST(:now AS double precision)), now()) AS now)
INSERT INTO throttle_counters AS t (key, hits, expires_at)
SELECT :key, 1, clock.now + make_interval(secs => :window) FROM clock
ON CONFLICT (key) DO UPDATE SET
    hits = CASE WHEN t.expires_at <= (SELECT now FROM clock) THEN 1 ELSE t.hits + 1 END,
    expires_at = CASE WHEN t.expires_at <= (SELECT now FROM clock) THEN EXCLUDED.expires_at ELSE t.expires_at END
RETURNING t.hits,
    CAST(GREATEST(1, CEIL(EXTRACT(EPOCH FROM t.expires_at - (SELECT now FROM clock)))) AS integer) AS retry_after
"""
)

# Before a login, one statement: count it in the address's login window; then, unless that
# refused it or the address is over its failure cap, count it for the (account, address) pair
# as if it will fail, setting the delay that failure earns, unless the pair is in a delay now
# (refused); then count it among the address's failures, again as if it will fail. A success
# undoes both (_SUCCESS). Counting before the outcome is what makes the limits exact under
# concurrency: row locks serialise the attempts on one pair, so however many race, only
# free_failures pass before the first delay (counting after the outcome let 12 of 16
# concurrent guesses through, measured). The statement is the plpgsql function
# throttle_login_check of migration 0002: planning that chain of three upserts cost twice its
# execution on every call (811 against 278 us prepared); a plpgsql function keeps its plan for
# the session (314 us) and needs no per-connection state (a server-side PREPARE would, and
# breaks behind a transaction-pooling proxy). `counted` is NULL when the attempt was refused.
_LOGIN_CHECK = text(
    """
SELECT set_config('lock_timeout', :deadline, true), set_config('statement_timeout', :deadline, true);
SELECT * FROM throttle_login_check(
    p_now => CAST(:now AS double precision),
    p_login_key => :login_key,
    p_login_window => :login_window,
    p_login_limit => :login_limit,
    p_failures_key => :failures_key,
    p_failures_window => :failures_window,
    p_failures_limit => :failures_limit,
    p_account_key => :account_key,
    p_free => :free,
    p_delay => :delay,
    p_delay_max => :delay_max,
    p_max_doublings => :max_doublings,
    p_reset => :reset
)
"""
)

# After a successful login: the pair starts again, and the attempt no longer counts among the
# address's failures. Two statements in one round trip, locking the rows in _LOGIN_CHECK's order.
_SUCCESS = text(
    """
SELECT set_config('lock_timeout', :deadline, true), set_config('statement_timeout', :deadline, true);
DELETE FROM throttle_counters WHERE key = :account_key;
UPDATE throttle_counters SET hits = GREATEST(hits - 1, 0)
WHERE key = :failures_key AND expires_at > COALESCE(to_timestamp(CAST(:now AS double precision)), now())
"""
)

# Expired rows, a batch at a time (a row past expires_at already counts as absent). SKIP LOCKED:
# never wait for, nor deadlock with, a request restarting one of them.
_SWEEP = text(
    """
SELECT set_config('lock_timeout', :deadline, true), set_config('statement_timeout', :deadline, true);
DELETE FROM throttle_counters WHERE key IN (
    SELECT key FROM throttle_counters
    WHERE expires_at <= COALESCE(to_timestamp(CAST(:now AS double precision)), now())
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
"""
)


@dataclasses.dataclass(frozen=True)
class Limits:
    register_limit: int
    register_window: int
    login_limit: int
    login_window: int
    failures_limit: int
    failures_window: int
    free_failures: int
    delay: int
    delay_max: int
    reset: int
    store_timeout_ms: int

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(
            register_limit=settings.throttle_register_limit,
            register_window=settings.throttle_register_window,
            login_limit=settings.throttle_login_limit,
            login_window=settings.throttle_login_window,
            failures_limit=settings.throttle_address_failures_limit,
            failures_window=settings.throttle_address_failures_window,
            free_failures=settings.throttle_account_free_failures,
            delay=settings.throttle_account_delay,
            delay_max=settings.throttle_account_delay_max,
            reset=settings.throttle_account_reset,
            store_timeout_ms=settings.throttle_store_timeout_ms,
        )

    def delay_after(self, failures: int) -> int | None:
        """Seconds an (account, address) pair is refused after its `failures`-th consecutive
        failure (None: not yet). The SQL of `_LOGIN_CHECK` computes the same."""
        if failures < self.free_failures:
            return None
        return min(self.delay_max, self.delay * 2 ** min(failures - self.free_failures, MAX_DOUBLINGS))


def client_address(remote_addr: str | None) -> str:
    """What a client is counted by: its IPv4 address, or its IPv6 /64 (one subscriber's block:
    a client picks any address in it at will). Anything else is hashed to a fixed length."""
    if not remote_addr:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return "other:" + hashlib.sha256(remote_addr.encode("utf-8", "replace")).hexdigest()[:32]
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _database_clock() -> float | None:
    return None  # the statements then use the database's now(): one clock for every host


class _StoreError(Exception):
    """A throttle statement failed; already counted and logged."""


class Throttle:
    """The limits of one app (app.extensions["throttle"]). `clock` returns the time the
    statements use, in epoch seconds, or None for the database's clock (tests replace it)."""

    def __init__(self, limits: Limits, *, secret: str, enabled: bool = True) -> None:
        self.limits = limits
        self.enabled = enabled
        self.clock: Callable[[], float | None] = _database_clock
        # The email is never stored or logged: a keyed hash stands for it (the key derives from
        # JWT_SECRET_KEY, which every worker and host shares; rotating it restarts the counters).
        self._hash_key = hashlib.sha256(b"flaskapi-throttle\x00" + secret.encode()).digest()
        self._deadline = str(limits.store_timeout_ms)
        self._warn_lock = threading.Lock()
        self._warned_at: float | None = None
        self._unlogged_failures = 0
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL * random.uniform(0.5, 1.5)  # noqa: S311 (jitter)

    # --- what the views call ------------------------------------------------------------------

    def check_register(self, remote_addr: str | None = None) -> None:
        """Before a registration: raise a 429 APIError if this address is over its limit."""
        if not self.enabled:
            return
        client = client_address(request.remote_addr if remote_addr is None else remote_addr)
        self._maybe_sweep()
        limits = self.limits
        try:
            row = self._run("register", _HIT, key=f"register|{client}", window=limits.register_window)
        except _StoreError:
            return
        if row.hits > limits.register_limit:
            self._refuse(REGISTER, "register_rate", row.retry_after, client)

    def login_attempt(self, email: str, remote_addr: str | None = None) -> LoginAttempt:
        """Before a login (email normalised): raise a 429 APIError if this address or this
        (account, address) pair is refused; otherwise the attempt, to report its outcome."""
        if not self.enabled:
            return LoginAttempt(self, client="", account="", counted=False)
        client = client_address(request.remote_addr if remote_addr is None else remote_addr)
        account = self.account_hash(email)
        self._maybe_sweep()
        limits = self.limits
        try:
            row = self._run(
                "login_check",
                _LOGIN_CHECK,
                login_key=f"login|{client}",
                login_window=limits.login_window,
                login_limit=limits.login_limit,
                failures_key=f"failures|{client}",
                failures_window=limits.failures_window,
                failures_limit=limits.failures_limit,
                account_key=f"account|{account}|{client}",
                reset=limits.reset,
                free=limits.free_failures,
                delay=limits.delay,
                delay_max=limits.delay_max,
                max_doublings=MAX_DOUBLINGS,
            )
        except _StoreError:
            return LoginAttempt(self, client=client, account=account, counted=False)
        if row.counted is None:  # refused: not counted for the pair, nor among the failures
            refusals = []
            if row.logins > limits.login_limit:
                refusals.append((row.logins_retry, "login_rate"))
            if row.address_failures >= limits.failures_limit:
                refusals.append((row.failures_retry, "address_failures"))
            if row.account_retry is not None:
                refusals.append((row.account_retry, "account_delay"))
            if not refusals:  # a concurrent attempt on the pair started a delay after our snapshot
                refusals.append((limits.delay_after(row.account_failures + 1) or 1, "account_delay"))
            retry_after, reason = max(refusals)  # the longest: retrying earlier is refused again
            self._refuse(LOGIN, reason, retry_after, client, account=account)
        return LoginAttempt(self, client=client, account=account, counted=True)

    def account_hash(self, email: str) -> str:
        return hmac.new(self._hash_key, email.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def sweep(self) -> int | None:
        """Delete up to SWEEP_BATCH expired rows; how many (None: the store failed)."""
        try:
            return self._run("sweep", _SWEEP, batch=SWEEP_BATCH)
        except _StoreError:
            return None

    # --- inside -------------------------------------------------------------------------------

    def _succeeded(self, attempt: LoginAttempt) -> None:
        with contextlib.suppress(_StoreError):
            self._run(
                "login_success",
                _SUCCESS,
                account_key=f"account|{attempt.account}|{attempt.client}",
                failures_key=f"failures|{attempt.client}",
            )

    def _run(self, operation: str, statement, **params):
        """One statement under the deadline: its first row, or for a DELETE the rows deleted."""
        params.update(deadline=self._deadline, now=self.clock())
        started = time.perf_counter()
        try:
            with db.engine.connect() as conn:
                result = conn.execute(statement, params)
                return result.first() if result.returns_rows else result.rowcount
        except sa_exc.DBAPIError as exc:  # a pool timeout (sa_exc.TimeoutError) is not one: 503
            self._store_failed(operation, exc)
            raise _StoreError from exc
        finally:
            STORE_SECONDS.labels(operation=operation).observe(time.perf_counter() - started)

    def _store_failed(self, operation: str, exc: sa_exc.DBAPIError) -> None:
        STORE_ERRORS.inc()
        now = time.monotonic()
        with self._warn_lock:
            if self._warned_at is not None and now - self._warned_at < WARNING_INTERVAL:
                self._unlogged_failures += 1
                return
            self._warned_at = now
            unlogged, self._unlogged_failures = self._unlogged_failures, 0
        error = type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__
        # Not str(exc): it quotes the statement's parameters. The class says enough (LockNotAvailable,
        # QueryCanceled: the deadline; OperationalError: the database is unreachable).
        log.warning(
            "throttle store failed (%s in %s): limits not applied (fail open); %d more since the last line",
            error,
            operation,
            unlogged,
            extra={
                "event": "throttle_store_error",
                "operation": operation,
                "error": error,
                "unlogged_since_last": unlogged,
                "store_timeout_ms": self.limits.store_timeout_ms,
            },
        )

    def _refuse(self, route: str, reason: str, retry_after: int, client: str, *, account: str | None = None) -> None:
        THROTTLED.labels(route=route, reason=reason).inc()
        extra = {"event": "throttled", "route": route, "reason": reason, "retry_after": retry_after, "client": client}
        if account is not None:
            extra["account"] = account[:16]  # a keyed hash, never the email
        log.info("throttled %s: %s, retry after %ds", route, reason, retry_after, extra=extra)
        raise APIError(
            429,
            f"{MESSAGES[reason]}; retry in {retry_after} s",
            details={"reason": reason, "retry_after": retry_after},
            headers={"Retry-After": str(retry_after)},
        )

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL * random.uniform(0.5, 1.5)  # noqa: S311 (jitter)
        self.sweep()


@dataclasses.dataclass
class LoginAttempt:
    """A login the limits let through, already counted as a failure; the view reports how it
    ended: a failure costs nothing more, a success one round trip to undo the count."""

    throttle: Throttle
    client: str
    account: str
    counted: bool  # False: the limits are off, or the store failed (nothing to undo)

    def failed(self) -> None:
        LOGIN_FAILURES.inc()

    def succeeded(self) -> None:
        if self.counted:
            self.throttle._succeeded(self)


def current() -> Throttle:
    return current_app.extensions["throttle"]


def init_app(app: Flask, settings) -> None:
    """The app's Throttle (off with THROTTLE_ENABLED=0). Opens no connection."""
    throttle = Throttle(
        Limits.from_settings(settings), secret=settings.jwt_secret_key, enabled=settings.throttle_enabled
    )
    app.extensions["throttle"] = throttle
    for route, reason in DECISIONS:  # every series exists, at 0, before the first refusal
        THROTTLED.labels(route=route, reason=reason)
    for operation in OPERATIONS:
        STORE_SECONDS.labels(operation=operation)
    if not throttle.enabled:
        log.warning("login and registration limits are off (THROTTLE_ENABLED=0)", extra={"event": "throttle_off"})
