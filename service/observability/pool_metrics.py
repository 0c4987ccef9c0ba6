"""The worker's DB pool, instrumented: every `flaskapi_db_pool_*` series comes from here.

Checkout waits and timeouts are recorded by InstrumentedQueuePool (service/database.py asks
`pool_class` for it), broken connections by the engine's "invalidate" event, the connections in
use by `sample` (called by the sampler thread of metrics.py), and the capacity once in each
worker, right after the fork. Off unless metrics are (metrics.enabled).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import Pool, QueuePool

from service.observability.metrics import enabled

POOL_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# registry=None: see metrics.py.
POOL_CAPACITY = Gauge(
    "flaskapi_db_pool_capacity",
    "Connections the pools may open (size + overflow)",
    registry=None,
    multiprocess_mode="livesum",
)
POOL_CHECKED_OUT = Gauge(
    "flaskapi_db_pool_checked_out",
    "Connections lent to requests (sampled every second)",
    registry=None,
    multiprocess_mode="livesum",
)
POOL_OVERFLOW = Gauge(
    "flaskapi_db_pool_overflow_in_use",
    "Connections open beyond the pool size (sampled every second)",
    registry=None,
    multiprocess_mode="livesum",
)
POOL_WAIT = Histogram(
    "flaskapi_db_pool_wait_seconds", "Time to obtain a pooled connection", registry=None, buckets=POOL_WAIT_BUCKETS
)
POOL_TIMEOUTS = Counter(
    "flaskapi_db_pool_checkout_timeouts_total",
    "Requests that found no free connection within DB_POOL_TIMEOUT",
    registry=None,
)
POOL_INVALIDATED = Counter(
    "flaskapi_db_pool_connections_invalidated_total",
    "Connections dropped as broken (database restart, network)",
    registry=None,
)

_engines: list[Engine] = []
_capacity = 0  # of the instrumented engines' pools
_in_worker = False  # worker_started ran: this process is a forked worker


class InstrumentedQueuePool(QueuePool):
    """QueuePool that times every checkout and counts the ones that time out."""

    # SQLAlchemy names a pool's logger after this, else after the class's module: under
    # "sqlalchemy", the pool's dispose/recreate chatter keeps that logger's level (logging_conf).
    _sqla_logger_namespace = "sqlalchemy.pool.impl.InstrumentedQueuePool"

    def connect(self):
        started = time.perf_counter()
        try:
            connection = super().connect()
        except PoolTimeout:
            POOL_TIMEOUTS.inc()
            raise
        finally:
            POOL_WAIT.observe(time.perf_counter() - started)
        return connection


def pool_class(settings) -> type[Pool]:
    """The engine's pool: instrumented when metrics are recorded, SQLAlchemy's own otherwise."""
    return InstrumentedQueuePool if enabled(settings) else QueuePool


def capacity(settings) -> int:
    """Connections one engine's pool may open."""
    return settings.pool_size + settings.max_overflow


def instrument(engine: Engine, settings) -> None:
    """Pool gauges (sampled) and counters (SQLAlchemy's pool events) for `engine`; its checkout
    waits and timeouts come from InstrumentedQueuePool (`pool_class`)."""
    global _capacity
    _engines.append(engine)
    _capacity += capacity(settings)
    if _in_worker:  # an app built after the fork (not preloaded)
        POOL_CAPACITY.set(_capacity)

    @event.listens_for(engine, "invalidate")
    def _invalidated(dbapi_connection, record, exception) -> None:
        POOL_INVALIDATED.inc()


def worker_started() -> None:
    """In each worker right after the fork (metrics.worker_started): its pools' capacity
    counts from the start."""
    global _in_worker
    _in_worker = True
    POOL_CAPACITY.set(_capacity)


def sample() -> None:
    """The pools' own counts, not inc/dec: a checkout that fails half-way still checks in."""
    pools = [engine.pool for engine in _engines]
    POOL_CHECKED_OUT.set(sum(pool.checkedout() for pool in pools))
    POOL_OVERFLOW.set(sum(max(0, pool.overflow()) for pool in pools))
