"""gunicorn's gthread worker with the hashing bulkhead (why and what: service/hashing_bulkhead.py).

How a hashing request travels (gunicorn 27.0.1's gthread.py: the main loop owns the poller and
every idle connection; `handle` runs on a request thread of `tpool`; its result goes back to the
main loop through `method_queue.defer(finish_request, ...)`, which keeps the connection alive or
closes it):

1. On a request thread, `handle` parses the request line and headers and calls `handle_request`.
   For a route that hashes, ours puts (connection, request) in the worker's HashingQueue and
   raises HandedOff: a BaseException, so neither handle_request's nor handle's `except
   Exception` answers it, and our own done-callback (`enqueue_req`) drops it instead of
   finishing the connection. The request thread is free at once; the body is still unread.
2. A hashing thread takes the oldest waiting request and runs `handle` again with the request
   already parsed (`serve_again`), so the request is served by gunicorn's own code, error
   handling included; its result goes to `finish_request` through the method queue like any.
3. Queue full: the request is shed at once, on its request thread. Waited too long, or the
   worker is ending its graceful stop: the main loop's periodic timeout sweep (`murder_pending`,
   at least once a second) sheds it on a request thread, so a hashing thread stuck in a slow
   request cannot delay a 503 (a hashing thread that takes an overdue one first answers it
   itself). Shedding runs the app with the verdict (hashing_bulkhead.shedding): the app answers
   503 auth_busy before any view.

A queued request whose client has closed its connection is dropped when its turn comes, before
anything is hashed (flaskapi_hash_abandoned_total): behind nginx that is a request nginx gave up
on. The body is read by the hashing thread: nginx buffers whole requests, so it is there already;
a client on the direct port that trickles its body holds the hashing thread, as it would hold a
request thread under plain gthread (gunicorn is never exposed to clients: docs/deployment.md).

The worker's timeout is not affected: the main loop keeps notifying the master however long the
queue. Stopping: queued requests are served during the graceful timeout like any in flight, and
those still waiting STOP_SHED_MARGIN before its end are answered 503 worker_stopping (the master
kills the worker at the end). SIGQUIT stops at once: the hashing threads are daemons, and the
kernel closes what they held.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future
from functools import partial

from gunicorn import util
from gunicorn.workers.gthread import PollableMethodQueue, ThreadWorker

from service import hashing_bulkhead
from service.hashing_bulkhead import ABANDONED, IN_PROGRESS, QUEUE_CAPACITY, QUEUE_DEPTH, QUEUE_WAIT, Shed

log = logging.getLogger("service.hashing")

# Queued requests still waiting this long before the graceful timeout ends are answered 503:
# time for those answers and for the hashes in progress before the master's SIGKILL.
STOP_SHED_MARGIN = 2.0


class HandedOff(BaseException):
    """Raised on a request thread once the hashing queue owns the connection (see module doc)."""


class _ClosingMethodQueue(PollableMethodQueue):
    """gthread's method queue, but nothing is written to its pipe once it is closed: a hashing
    thread finishing after the main loop has ended would write to a descriptor number that may
    already be reused. `defer` says whether the callback was queued. The lock is reentrant:
    gunicorn's SIGTERM handler defers too, on the main thread, which may be inside `defer`."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._closed = False

    def defer(self, callback, *args) -> bool:
        with self._lock:
            if self._closed:
                return False
            super().defer(callback, *args)
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            super().close()


class _Parsed:
    """Stands in for a connection's parser for one `next()`: gives back the request parsed
    before the handoff, and puts the real parser back."""

    def __init__(self, conn, req) -> None:
        self.conn, self.req, self.parser = conn, req, conn.parser

    def __iter__(self):
        return self

    def __next__(self):
        self.conn.parser = self.parser
        return self.req


_thread = threading.local()  # .again: this thread serves a handed-off request (its Shed, or None)
_SERVE = object()  # _thread.again when the request is to be served, not shed


class HashingBulkheadWorker(ThreadWorker):
    """gthread's ThreadWorker; requests to routes marked `hashes_passwords` are served by the
    worker's HashingQueue (module doc). An app with no such route runs exactly as under gthread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.method_queue = _ClosingMethodQueue()
        self.hashing: HashingQueue | None = None

    def run(self) -> None:
        self.hashing = HashingQueue.start(self)
        try:
            super().run()
        finally:
            if self.hashing is not None:
                self.hashing.close()

    # --- request threads ---------------------------------------------------------------------

    def enqueue_req(self, conn) -> None:
        self._on_request_thread(self.handle, conn)

    def _on_request_thread(self, fn, conn, *args) -> None:
        try:
            future = self.tpool.submit(fn, conn, *args)
        except RuntimeError:  # the pool is shut down: the main loop has ended
            conn.close()
            return
        future.add_done_callback(partial(self._request_thread_done, conn))

    def _request_thread_done(self, conn, future: Future) -> None:
        if not future.cancelled() and isinstance(future.exception(), HandedOff):
            return  # the hashing queue owns the connection now
        self.finish(conn, future)

    def finish(self, conn, future: Future) -> None:
        """From any thread: `finish_request` on the main loop, or a close once it has ended."""
        if not self.method_queue.defer(self.finish_request, conn, future):
            conn.close()

    def handle_request(self, req, conn):
        again = getattr(_thread, "again", None)
        if again is not None:  # served or shed after the handoff: never handed off twice
            _thread.again = None
            with hashing_bulkhead.shedding(None if again is _SERVE else again):
                return super().handle_request(req, conn)
        if self.hashing is not None and self.hashing.wants(req):
            shed = self.hashing.offer(conn, req)
            if shed is None:
                raise HandedOff
            with hashing_bulkhead.shedding(shed):
                return super().handle_request(req, conn)
        return super().handle_request(req, conn)

    def serve_again(self, conn, req, shed: Shed | None = None):
        """`handle(conn)` for a request parsed before its handoff: the same steps and error
        handling as for any request; served, or answered 503 when `shed`."""
        _thread.again = _SERVE if shed is None else shed
        conn.parser = _Parsed(conn, req)
        try:
            return self.handle(conn)
        finally:
            _thread.again = None
            if isinstance(conn.parser, _Parsed):  # handle() failed before parsing
                conn.parser = conn.parser.parser

    def shed(self, conn, req, shed: Shed) -> None:
        """From the main loop's sweep: answer a request taken off the queue 503, on a request
        thread."""
        self._on_request_thread(self.serve_again, conn, req, shed)

    def murder_pending(self) -> None:
        """gthread's sweep of connections waiting too long, run by the main loop after every
        wakeup (at least once a second, stopping too): queued hashing requests included."""
        super().murder_pending()
        if self.hashing is not None:
            self.hashing.expire()


def _finished(result) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _client_gone(conn) -> bool:
    """The client closed or reset its connection (nothing left to read but the end)."""
    try:
        return conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # connected, nothing more sent: waiting for its answer
    except ValueError:
        return False  # a TLS socket takes no flags: cannot tell, serve it
    except OSError:
        return True


@dataclasses.dataclass
class _Waiting:
    conn: object
    req: object
    since: float  # time.monotonic() when it joined the queue


class HashingQueue:
    """The per-worker queue of handed-off requests and the threads that serve it."""

    def __init__(self, worker: HashingBulkheadWorker, routes: frozenset, settings) -> None:
        self.worker = worker
        self.routes = routes
        self.threads = settings.hash_threads
        self.depth_max = settings.hash_queue_max
        self.wait_max = settings.hash_queue_timeout
        self.nice = settings.hash_nice
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._closed = False
        self._stop_shed_at: float | None = None  # from then on (stopping), the queued are shed

    @classmethod
    def start(cls, worker: HashingBulkheadWorker) -> HashingQueue | None:
        """The queue and its threads, in the worker after its app is loaded; None when the app
        has no hashing route or is not ours."""
        app = worker.wsgi
        settings = getattr(app, "config", {}).get("APP_SETTINGS")
        routes = hashing_bulkhead.routes(app) if settings is not None else frozenset()
        if not routes:
            return None
        queue = cls(worker, routes, settings)
        QUEUE_CAPACITY.set(queue.depth_max)
        # A thread inherits the CPU priority of the thread that starts it: the process's helper
        # that a request would otherwise start lazily, maybe from a hashing thread, starts here.
        if settings.db_client_timeout_ms:
            from service.database import watchdog

            watchdog.start()
        for number in range(queue.threads):
            threading.Thread(target=queue._serve_forever, name=f"hashing-{number}", daemon=True).start()
        log.info(
            "hashing bulkhead: %d thread(s) at nice +%d, at most %d waiting for at most %gs",
            queue.threads,
            queue.nice,
            queue.depth_max,
            queue.wait_max,
            extra={"event": "hash_bulkhead_started", "worker_pid": os.getpid()},
        )
        return queue

    def wants(self, req) -> bool:
        """A request to a hashing route, its path decoded as the WSGI environ's PATH_INFO is."""
        return (req.method, util.unquote_to_wsgi_str(req.path)) in self.routes

    def offer(self, conn, req) -> Shed | None:
        """On a request thread: queue the request (None), or the verdict that sheds it."""
        now = time.monotonic()
        with self._lock:
            if self._closed or self._stopping(now):
                return Shed("worker_stopping", 0.0, len(self._waiting), 1)
            if len(self._waiting) >= self.depth_max:
                return Shed("queue_full", 0.0, len(self._waiting), self._retry_after(now))
            self._waiting.append(_Waiting(conn, req, now))
            QUEUE_DEPTH.set(len(self._waiting))
            self._work.notify()
        return None

    def expire(self) -> None:
        """On the main loop: shed what waited too long, and everything once the worker is near
        the end of its graceful stop."""
        now = time.monotonic()
        shed = []
        with self._lock:
            if not self.worker.alive and self._stop_shed_at is None:
                self._stop_shed_at = now + max(0.0, self.worker.cfg.graceful_timeout - STOP_SHED_MARGIN)
            while self._waiting and (verdict := self._take_if_overdue(now)):
                shed.append(verdict)
        for entry, verdict in shed:
            self.worker.shed(entry.conn, entry.req, verdict)

    def _take(self, now: float) -> tuple[_Waiting, Shed | None]:
        """The oldest waiting request, off the queue, with its wait recorded and the verdict that
        sheds it (None: serve it). Under the lock, the queue not empty."""
        entry = self._waiting.popleft()
        QUEUE_DEPTH.set(len(self._waiting))
        waited = now - entry.since
        QUEUE_WAIT.observe(waited)
        if self._stopping(now):
            return entry, Shed("worker_stopping", waited, len(self._waiting), 1)
        if waited >= self.wait_max:
            return entry, Shed("waited_too_long", waited, len(self._waiting), self._retry_after(now))
        return entry, None

    def _take_if_overdue(self, now: float) -> tuple[_Waiting, Shed] | None:
        oldest = self._waiting[0]
        if not (self._stopping(now) or now - oldest.since >= self.wait_max):
            return None
        return self._take(now)

    def _stopping(self, now: float) -> bool:
        return self._stop_shed_at is not None and now >= self._stop_shed_at

    def _retry_after(self, now: float) -> int:
        """How long the oldest request still waiting has waited, in whole seconds (at least 1,
        at most HASH_QUEUE_TIMEOUT): about how long this queue takes to drain. Under the lock."""
        age = now - self._waiting[0].since if self._waiting else 0.0
        return max(1, min(math.ceil(age), math.ceil(self.wait_max)))

    def close(self) -> None:
        """After the main loop has ended: the threads stop after their request, and whatever
        still waits is closed unanswered (the loop that would finish it is gone)."""
        with self._lock:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            QUEUE_DEPTH.set(0)
            self._work.notify_all()
        for entry in left:
            entry.conn.close()
        if left:
            log.warning(
                "worker %d stopped with %d hashing request(s) still queued: closed unanswered",
                os.getpid(),
                len(left),
                extra={"event": "hash_queue_closed", "worker_pid": os.getpid(), "queue_depth": len(left)},
            )

    # --- hashing threads ---------------------------------------------------------------------

    def _serve_forever(self) -> None:
        self._lower_priority()
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                entry, verdict = self._take(time.monotonic())
            if verdict is not None:
                # Overdue, and the main loop's sweep has not got to it yet: its 503 costs no
                # hash, so it is answered here. (Never handed to the request threads from here:
                # a request thread the pool started from this thread would inherit its priority.)
                self._run(entry, verdict)
            elif _client_gone(entry.conn):
                ABANDONED.inc()
                self.worker.finish(entry.conn, _finished(False))
            else:
                IN_PROGRESS.inc()
                try:
                    self._run(entry)
                finally:
                    IN_PROGRESS.dec()

    def _run(self, entry: _Waiting, shed: Shed | None = None) -> None:
        try:
            future = _finished(self.worker.serve_again(entry.conn, entry.req, shed))
        except Exception as exc:  # handle() answers everything; a failure here must not end the thread
            log.exception("hashing thread failed to serve a request", extra={"event": "hash_serve_failed"})
            future = Future()
            future.set_exception(exc)
        self.worker.finish(entry.conn, future)

    def _lower_priority(self) -> None:
        """This thread only, HASH_NICE below the rest of the process (Linux applies a nice value
        to the thread whose id it is given; raising one's own needs no privilege)."""
        if not self.nice:
            return
        if not sys.platform.startswith("linux"):  # elsewhere the id could name another process
            log.info("hashing threads keep their priority: HASH_NICE applies on Linux only")
            return
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
        except OSError as exc:
            log.warning("hashing thread keeps its priority: %s", exc, extra={"event": "hash_nice_failed"})
