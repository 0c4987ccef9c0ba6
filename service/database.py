"""How the service talks to Postgres: engine options, client-side deadlines, the stale-connection check.

Autocommit: each statement of a request is its own transaction (every write here is a single
statement), so a request costs one round trip per statement instead of three (psycopg2's
BEGIN, the statement, and the COMMIT or the pool's ROLLBACK on return). Work that needs a
multi-statement transaction asks for one (migrations, the seed command).

SQLAlchemy's `pool_pre_ping` costs a round trip on every checkout (~90 us, 15 % of a list page,
measured). A connection used a moment ago is known to be alive, so the check here (SQLAlchemy's
documented pessimistic-disconnect recipe, made conditional) pings only connections that sat in
the pool longer than DB_PING_IDLE_SECONDS: after a database restart those fail the ping and
are replaced before a request sees them, and connections that were in use during an outage
were already invalidated by SQLAlchemy's disconnect handling. The service recovers by itself.

Client-side deadlines. `statement_timeout` is enforced by the server: a server that is frozen
(SIGSTOP, a stuck host, a VM paused) or unreachable (a network black hole) never fires it, and
libpq has no query timeout of its own, so a statement waited forever (measured: every worker
thread stuck, /healthz too, for the 40 s of a freeze). Here:

- connecting: libpq's `connect_timeout`; over TCP also keepalives (an idle pooled connection to
  a vanished host is found dead in about a minute) and `tcp_user_timeout` (sent data left
  unacknowledged that long closes the socket, instead of the kernel's ~15 min of retransmissions).
  libpq ignores these on a Unix socket, where they are not needed.
- every round trip (cursor `execute`/`executemany`, `commit`/`rollback` of an explicit
  transaction) runs under a deadline kept by one watchdog thread per process: past it, the
  watchdog shuts the connection's socket down, libpq's blocked read returns at once, and the
  statement fails with DatabaseTimeout; the connection is discarded (SQLAlchemy invalidates it,
  handle_timeouts), never reused. The deadline is DB_CLIENT_TIMEOUT_MS (default
  DB_STATEMENT_TIMEOUT_MS + 1 s, so that on a live database the server's own timeout always fires
  first and keeps the connection), DB_PING_TIMEOUT_MS for the idle check and /readyz.
- while the database is known not to answer (a deadline passed and nothing answered since),
  statements are refused at once, before anything is sent, except one at a time per process
  (the probe, which waits its full deadline): the first answer after the database comes back
  ends it. So a freeze ties up one thread per process instead of all of them, and requests
  refused this way were never sent (a statement cut at its deadline was, and the database may
  still commit it when it resumes: a 503 database_timeout write is of unknown outcome).

Why a watchdog and not psycopg2's wait callback (`set_wait_callback` with a select that has a
deadline, the documented way): the callback is process-global and puts every connection in
asynchronous mode, where COPY is refused (the seed command streams books with COPY) and libpq
ignores `connect_timeout`. The watchdog leaves libpq's blocking calls as they are. Its cost,
measured side by side on one Postgres over its Unix socket (`python -m bench.db_deadline_cost`:
`SELECT 1`, medians of 7 interleaved rounds of 20,000 on the loaded 2-core box): +3.0 us of the
client's CPU a statement (10.4 -> 13.5 us) and +4.5 us of wall time (22.9 -> 27.4 us), of which
arming and disarming are 1.4 us; under 1 % of a list page (~600 us).

COPY (the seed command) has the server's statement_timeout only.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg2
import psycopg2.extensions
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

from service.settings import Settings

log = logging.getLogger(__name__)

# Over TCP: an idle connection is probed after 30 s, every 10 s, and declared dead after 3
# unanswered probes (or, sooner, by tcp_user_timeout, which Linux applies to the probes too).
KEEPALIVES_IDLE_S = 30
KEEPALIVES_INTERVAL_S = 10
KEEPALIVES_COUNT = 3
WATCHDOG_IDLE_WAKE_S = 1.0  # how often an idle watchdog wakes (module Watchdog)


class DatabaseTimeout(psycopg2.OperationalError):
    """The database did not answer within a client-side deadline.

    `sent`: the statement (or connection attempt) went out and its deadline passed, so the
    connection is discarded; False: refused before sending, the database being known not to
    answer (the connection is fine and goes back to the pool)."""

    def __init__(self, message: str, *, timeout_s: float | None, sent: bool, phase: str) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s
        self.sent = sent
        self.phase = phase


# --- the watchdog ---------------------------------------------------------------------------


class _Timer:
    __slots__ = ("deadline", "fd", "fired")

    def __init__(self, deadline: float, fd: int) -> None:
        self.deadline = deadline
        self.fd = fd
        self.fired = False


class Watchdog:
    """One thread per process that shuts down the socket of a round trip past its deadline.

    Arming and disarming take no lock (a dict insert and pop, atomic under the GIL): whichever
    of the round trip's disarm and the watchdog pops the timer first owns it. The socket is held
    by a duplicate descriptor while armed, so if libpq closes its own on an error the number can
    be reused by another file and never be shut by mistake; a round trip whose timer the watchdog
    took waits for the shutdown to finish before closing it. At most one round trip is armed per
    worker thread, so the watchdog scans a handful. When idle the thread wakes every
    WATCHDOG_IDLE_WAKE_S, so arming a deadline at least that far away never has to wake it."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a lock held at fork stays held in the child

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[int, _Timer] = {}
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread now rather than at the first round trip: a thread inherits the CPU
        priority of the thread that starts it, and the hashing bulkhead's threads run at a lower
        one (service/hashing_worker.py)."""
        with self._cond:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="db-deadline-watchdog", daemon=True)
            self._thread.start()

    def arm(self, fd: int, seconds: float) -> _Timer:
        timer = _Timer(time.monotonic() + seconds, os.dup(fd))
        self._armed[id(timer)] = timer
        if timer.deadline < self._wake_at:  # sooner than the watchdog looks next (or not started)
            with self._cond:
                self._start_locked()
                self._cond.notify()
        return timer

    def disarm(self, timer: _Timer) -> bool:
        """Whether the deadline passed (the socket was shut down)."""
        if self._armed.pop(id(timer), None) is None:  # the watchdog took it
            while not timer.fired:
                time.sleep(0.001)
        os.close(timer.fd)
        return timer.fired

    def _run(self) -> None:
        with self._cond:
            while True:
                self._wake_at = math.inf  # while scanning, a round trip armed now wakes us again
                now = time.monotonic()
                next_at = now + WATCHDOG_IDLE_WAKE_S
                for key, timer in list(self._armed.items()):
                    if timer.deadline > now:
                        next_at = min(next_at, timer.deadline)
                    elif self._armed.pop(key, None) is timer:  # not disarmed meanwhile: ours
                        try:
                            _shut_down(timer.fd)
                        finally:
                            timer.fired = True
                self._wake_at = next_at
                self._cond.wait(next_at - now)


def _shut_down(fd: int) -> None:
    """Both directions of the socket behind `fd`: a read blocked on it returns at once."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # the descriptor stays open: the round trip closes it


watchdog = Watchdog()


# --- deadlines and the unanswered state -----------------------------------------------------


class _Budget:
    __slots__ = ("at", "probe")

    def __init__(self, at: float, probe: bool) -> None:
        self.at = at
        self.probe = probe


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("db_deadline_budget", default=None)


@contextlib.contextmanager
def deadline(seconds: float, *, probe: bool = False) -> Iterator[None]:
    """Every round trip inside waits at most until `seconds` from now (and its own deadline).
    `probe`: sent even while the database is known not to answer (readiness checks it)."""
    outer = _budget.get()
    at = time.monotonic() + seconds
    if outer is not None:
        at = min(at, outer.at)
        probe = probe or outer.probe
    token = _budget.set(_Budget(at, probe))
    try:
        yield
    finally:
        _budget.reset(token)


class Deadlines:
    """One engine's deadlines and whether its database is answering (per process)."""

    def __init__(self, *, statement_s: float | None, ping_s: float, connect_s: int) -> None:
        self.statement_s = statement_s  # None: no client deadline on statements
        self.ping_s = ping_s
        self.connect_s = connect_s
        self.unanswered_since: float | None = None  # monotonic; None while it answers
        self._probe = threading.Lock()  # held by the one round trip let through while unanswered
        self._state_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Deadlines:
        client_ms = settings.db_client_timeout_ms
        return cls(
            statement_s=client_ms / 1000 if client_ms else None,
            ping_s=settings.db_ping_timeout_ms / 1000,
            connect_s=settings.db_connect_timeout,
        )

    @property
    def answering(self) -> bool:
        return self.unanswered_since is None

    def connection_factory(self) -> type[DeadlineConnection]:
        """psycopg2's `connection_factory`: connections that keep these deadlines."""
        return type("DeadlineConnection", (DeadlineConnection,), {"deadlines": self})

    # --- inside -----------------------------------------------------------------------------

    def _admit(self, phase: str) -> bool:
        """Whether the caller holds the probe (to release); raises when refused."""
        if self.unanswered_since is None:
            return False
        budget = _budget.get()
        if budget is not None and budget.probe:
            return False
        if self._probe.acquire(blocking=False):
            return True
        waited = time.monotonic() - (self.unanswered_since or time.monotonic())
        raise DatabaseTimeout(
            f"database not answering for {waited:.1f}s: refused without sending",
            timeout_s=self.statement_s,
            sent=False,
            phase=phase,
        )

    def _within(self, budget: _Budget) -> float:
        left = max(0.0, budget.at - time.monotonic())
        return left if self.statement_s is None else min(left, self.statement_s)

    def _answered(self) -> None:
        with self._state_lock:
            since, self.unanswered_since = self.unanswered_since, None
        if since is not None:
            unanswered = time.monotonic() - since
            log.info(
                "database answering again after %.1fs without an answer",
                unanswered,
                extra={"event": "db_answering", "unanswered_s": round(unanswered, 3)},
            )

    def _unanswered(self) -> None:
        if self.unanswered_since is None:
            self.unanswered_since = time.monotonic()

    def round_trip(self, conn, phase: str, call: Callable, *args, gate: bool = True):
        """`call(*args)` (a blocking libpq round trip on `conn`) under the deadline; refused
        unsent while the database does not answer, unless it is the probe or not `gate`d."""
        probe = self._admit(phase) if gate and self.unanswered_since is not None else False
        try:
            budget = _budget.get()
            timeout = self.statement_s if budget is None else self._within(budget)
            if timeout is None:
                result = call(*args)
            else:
                if timeout <= 0:  # the caller's budget is spent: do not send
                    raise DatabaseTimeout(
                        f"no time left to wait for the database ({phase})", timeout_s=0.0, sent=False, phase=phase
                    )
                try:
                    timer = watchdog.arm(conn.fileno(), timeout)
                except (psycopg2.InterfaceError, OSError):  # closed: psycopg2 itself says so
                    return call(*args)
                try:
                    result = call(*args)
                except psycopg2.Error as exc:
                    if watchdog.disarm(timer):
                        raise self._passed(timeout, phase) from exc
                    if self.unanswered_since is not None:
                        self._answered()  # an error from the server is an answer
                    raise
                except BaseException:
                    watchdog.disarm(timer)
                    raise
                if watchdog.disarm(timer):  # answered just as the socket was shut: it is gone
                    raise self._passed(timeout, phase)
            if self.unanswered_since is not None:
                self._answered()
            return result
        finally:
            if probe:
                self._probe.release()

    def _passed(self, timeout: float, phase: str) -> DatabaseTimeout:
        self._unanswered()
        return DatabaseTimeout(
            f"database did not answer within {timeout:.3g}s ({phase}): connection discarded",
            timeout_s=timeout,
            sent=True,
            phase=phase,
        )

    def connect_failed(self, exc: psycopg2.OperationalError, connect_s: int) -> psycopg2.OperationalError:
        """libpq's connect_timeout is a timeout like the others; other failures answer fast."""
        if "timeout expired" not in str(exc):
            return exc
        self._unanswered()
        return DatabaseTimeout(
            f"database did not answer within {connect_s}s (connect)",
            timeout_s=float(connect_s),
            sent=True,
            phase="connect",
        )


_execute = psycopg2.extensions.cursor.execute
_executemany = psycopg2.extensions.cursor.executemany


class DeadlineCursor(psycopg2.extensions.cursor):
    def execute(self, query, vars=None):
        conn = self.connection
        return conn.deadlines.round_trip(conn, "statement", _execute, self, query, vars)

    def executemany(self, query, vars_list):
        conn = self.connection
        return conn.deadlines.round_trip(conn, "statement", _executemany, self, query, vars_list)


class DeadlineConnection(psycopg2.extensions.connection):
    """A psycopg2 connection whose cursors and transactions keep `deadlines` (set per engine
    by Deadlines.connection_factory); connecting is refused while the database does not answer."""

    deadlines: Deadlines

    def __init__(self, dsn, *args, **kwargs) -> None:
        probe = self.deadlines._admit("connect")
        connect_s = self.deadlines.connect_s
        budget = _budget.get()
        if budget is not None:  # within a shorter deadline (/readyz): connect within what is left of it
            left = max(1, math.ceil(budget.at - time.monotonic()))  # libpq counts whole seconds
            if left < connect_s:
                connect_s = left
                dsn = psycopg2.extensions.make_dsn(dsn, connect_timeout=left)
        try:
            super().__init__(dsn, *args, **kwargs)
        except psycopg2.OperationalError as exc:
            failure = self.deadlines.connect_failed(exc, connect_s)
            if failure is exc:
                raise
            raise failure from exc
        finally:
            if probe:
                self.deadlines._probe.release()
        self.cursor_factory = DeadlineCursor

    def commit(self) -> None:
        if self.autocommit:
            return super().commit()
        return self.deadlines.round_trip(self, "commit", super().commit)

    def rollback(self) -> None:
        if self.autocommit:  # psycopg2 sends nothing (the pool's reset on every checkin)
            return super().rollback()
        # never refused: it ends a transaction the pool would otherwise discard the connection for
        return self.deadlines.round_trip(self, "rollback", super().rollback, gate=False)


# --- the engine -----------------------------------------------------------------------------


def engine_options(settings: Settings, deadlines: Deadlines | None = None) -> dict:
    from service.observability import pool_metrics

    deadlines = deadlines or Deadlines.from_settings(settings)
    return {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        "pool_pre_ping": False,  # see ping_idle_connections
        "isolation_level": "AUTOCOMMIT",
        # A failed statement's error (its log line, its Sentry event) shows the SQL but never the
        # values bound to it: those are what clients sent (emails, titles) or secrets.
        "hide_parameters": True,
        "poolclass": pool_metrics.pool_class(settings),
        "connect_args": {
            "connect_timeout": settings.db_connect_timeout,
            "application_name": "flaskapi-observability",
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
            **tcp_parameters(settings),
            "connection_factory": deadlines.connection_factory(),
        },
    }


def tcp_parameters(settings: Settings) -> dict:
    """libpq's TCP deadlines (ignored on a Unix socket)."""
    return {
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE_S,
        "keepalives_interval": KEEPALIVES_INTERVAL_S,
        "keepalives_count": KEEPALIVES_COUNT,
        # 0: the kernel's default, when statements have no client deadline either
        "tcp_user_timeout": settings.db_client_timeout_ms,
    }


def deadlines_of(dbapi_connection) -> Deadlines | None:
    return getattr(dbapi_connection, "deadlines", None)


def handle_timeouts(engine: Engine) -> None:
    """A statement cut at its deadline left its connection in an unknown state: discard that
    connection (not the whole pool: the others were idle and are checked by the idle ping).
    A refused one was never sent and keeps its connection."""

    @event.listens_for(engine, "handle_error")
    def _timed_out(context) -> None:
        orig = context.original_exception
        if isinstance(orig, DatabaseTimeout) and orig.sent:
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False


def ping_idle_connections(engine: Engine, *, idle_seconds: float) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection, record) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checking_out(dbapi_connection, record, proxy) -> None:
        returned = record.info.get("checked_in_at")
        if returned is None or time.monotonic() - returned <= idle_seconds:
            return  # new, or used a moment ago
        deadlines = deadlines_of(dbapi_connection)
        if deadlines is not None and not deadlines.answering:
            return  # the request's own statement is refused or is the probe: no ping to wait on
        try:
            with deadline(deadlines.ping_s) if deadlines is not None else contextlib.nullcontext():
                cursor = dbapi_connection.cursor()
                cursor.execute("SELECT 1")
                cursor.close()
        except DatabaseTimeout:
            raise  # the database does not answer: another connection would not either
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out another (up to three tries).
            raise DisconnectionError(f"stale connection: {exc}") from exc
