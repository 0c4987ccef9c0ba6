"""A worker whose master died: stop listening at once, report it, leave within GRACE_SECONDS.

Without this, a worker orphaned by a SIGKILLed (or OOM-killed) master notices it only in its own
loop, and then stops gracefully the way gunicorn stops: its copy of every listening socket stays
open until its last connection is done (up to GUNICORN_GRACEFUL_TIMEOUT). Meanwhile the kernel
keeps accepting connections on the API port and queuing them for nobody (clients hang), a new
master cannot bind the port ("Connection in use"), and the log holds one INFO line.

How a worker learns it at once, without polling: the kernel sends it SIGNAL when the process
that forked it dies (Linux's PR_SET_PDEATHSIG). That signal is blocked in every thread of the
worker and a watcher thread waits for it with sigwait, so nothing runs in a signal handler
(which could interrupt the main loop, a log write or a lock) and the signal, delivered to a
worker for any other reason, does nothing but a check of the parent pid. PDEATHSIG follows the
parent *thread* that forked: gunicorn's master forks only from its main thread (its metrics and
control-socket threads never fork), so the signal comes when the master process dies, not when
one of its threads ends. Elsewhere than Linux nothing is added: gunicorn's own check of the
parent remains (within a second for gthread workers).

What the watcher then does, in this order:
1. The worker drops its reference to each listening socket (`_drop_listeners`): once every
   orphaned worker has (they all get the signal at the same moment), the kernel socket is
   closed, a new connection is refused, and a new master can bind the ports. Only this
   process's descriptor is replaced, never the shared socket shut down: the socket may also be
   held by a master started by USR2, or by systemd's socket activation.
2. gunicorn's graceful stop, as the master would ask for it (SIGTERM to the worker's main
   thread), with idle kept-alive connections closed within gunicorn's stop linger (2 s):
   requests in flight finish, then the worker exits.
3. One ERROR line with the dead master's pid (event `master_died`), hence a Sentry event,
   sent at once.
4. After GRACE_SECONDS, whatever is still running is cut (`os._exit`, after a WARNING
   `orphan_cut`): with no master left to enforce the worker timeout, nothing else would end a
   stuck request.

Under systemd (KillMode=mixed) the unit's remaining processes are killed as soon as the master
is gone, and the unit restarted RestartSec later: this module matters where no supervisor
cleans up (a container whose init is not the master, a master started by hand, `make run`),
and it is what makes the death a logged, reported fact in every case.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time

from gunicorn.workers import gthread

log = logging.getLogger("service.workers")

# A real-time signal gunicorn never uses (its SIGUSR1/USR2 are reset to the default, terminate,
# in every worker it starts), blocked in the master before it forks (`block_in_master`), so every
# thread of every worker has it blocked from its first instruction: the threads other modules
# start before post_fork (the log file's watcher, forked-child hooks) included.
SIGNAL = signal.SIGRTMIN + 2
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How long a stopping gthread worker keeps an idle kept-alive connection (gunicorn's own value).
STOP_KEEPALIVE_LINGER = getattr(gthread, "STOP_KEEPALIVE_LINGER", 2.0)
# Requests in flight when the master died get this long: the app's own requests answer in
# milliseconds, its database statements are cut at DB_STATEMENT_TIMEOUT_MS (10 s by default:
# a statement that slow is cut here too), and every second of it is a second the port stays
# half served by workers nobody replaces.
GRACE_SECONDS = 5.0


def block_in_master() -> None:
    """In the master's main thread, before any worker is forked (gunicorn's on_starting): a
    forked process starts with its forking thread's signal mask, and its threads with their
    creator's."""
    if sys.platform.startswith("linux"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {SIGNAL})


def watch(worker) -> bool:
    """In a newly forked worker (gunicorn's post_fork hook): be told when the master dies.
    False where the kernel cannot tell (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    master_pid = worker.ppid
    # Already blocked since the master's on_starting, in every thread (threads inherit the
    # mask); again here for a master that did not run that hook. Only the watcher's sigwait
    # ever takes the signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, {SIGNAL})
    libc = ctypes.CDLL(None, use_errno=True)
    args = [ctypes.c_ulong(value) for value in (int(SIGNAL), 0, 0, 0)]  # unsigned long, as the kernel reads them
    if libc.prctl(PR_SET_PDEATHSIG, *args) != 0:  # never fail a worker's start for this
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIGNAL})
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed (%s): this worker will not notice at once if its master dies",
            os.strerror(ctypes.get_errno()),
            extra={"event": "master_watch_unavailable"},
        )
        return False
    reported = threading.Event()
    # An orphan with nothing in flight may end at once (gunicorn's loop notices the new parent
    # by itself): its exit waits for the report, which a daemon thread would not finish once
    # the interpreter is past its exit handlers.
    atexit.register(_await_report, master_pid, reported)
    watcher = threading.Thread(target=_watch, args=(worker, master_pid, reported), name="master-watch", daemon=True)
    watcher.start()
    return True


def _await_report(master_pid: int, reported: threading.Event) -> None:
    if os.getppid() != master_pid:
        reported.wait(GRACE_SECONDS)


def _watch(worker, master_pid: int, reported: threading.Event) -> None:
    # The check after a wakeup also covers a master that died before prctl: no signal then,
    # but the first check already sees the new parent.
    while os.getppid() == master_pid:
        signal.sigwait({SIGNAL})
    orphaned(worker, master_pid, reported)


def orphaned(worker, master_pid: int, reported: threading.Event) -> None:
    """The steps of the module doc, from the watcher thread."""
    deadline = time.monotonic() + GRACE_SECONDS
    method_queue = getattr(worker, "method_queue", None)
    if method_queue is not None:
        # gthread: its main loop owns the poller and the connections: the stop runs there.
        method_queue.defer(_stop_accepting, worker)
    else:
        # sync: its loop only accepts (non-blocking) or selects: safe from any thread.
        _stop_accepting(worker)
    # gunicorn's graceful stop, as the master asks for it, in the main thread (where Python
    # runs signal handlers): it also wakes a sync worker from its select.
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.set_tag("master_pid", master_pid)
        scope.set_tag("worker_pid", os.getpid())
        scope.fingerprint = ["gunicorn-master-died"]
        log.error(
            "gunicorn master %d died: worker %d stops listening, finishes its requests (at most %g s) and exits",
            master_pid,
            os.getpid(),
            GRACE_SECONDS,
            extra={"event": "master_died", "master_pid": master_pid, "worker_pid": os.getpid()},
        )
    from service.observability.sentry import flush

    flush()
    reported.set()
    time.sleep(max(0.0, deadline - time.monotonic()))
    log.warning(
        "worker %d still busy %g s after its master died: exiting now",
        os.getpid(),
        GRACE_SECONDS,
        extra={"event": "orphan_cut", "master_pid": master_pid, "worker_pid": os.getpid()},
    )
    flush()
    os._exit(1)


def _stop_accepting(worker) -> None:
    """No new connection, and none kept open for long: the listeners dropped, the worker no
    longer alive, kept-alive connections closed within gunicorn's stop linger.

    gthread's loop may have noticed the new parent on its own a moment earlier (it checks after
    every wakeup) and begun its graceful stop while still "alive": a request that ended in
    between kept its connection for the full GUNICORN_KEEPALIVE. Here, in that loop, they are
    cut to the linger, and every later one too (the loop caps them once not alive)."""
    _drop_listeners(worker)
    worker.alive = False
    kept_alive = getattr(worker, "keepalived_conns", ())
    linger_end = time.monotonic() + STOP_KEEPALIVE_LINGER
    for conn in kept_alive:  # sorted by timeout: capping them all at one time keeps the order
        conn.timeout = min(conn.timeout, linger_end)


def _drop_listeners(worker) -> None:
    """Replace this process's descriptor of every listening socket with a placeholder.

    The descriptor number stays valid, so the worker's loop, which still holds it, carries on
    without an error: the placeholder is a listening socket no client knows of (a Unix socket
    at an abstract name the kernel picks), so accept() says EAGAIN and the poller never reports
    it.
    gthread's loop must have taken the listeners off its poller first (it runs this): epoll
    keeps watching a shared socket whose descriptor was replaced, and would keep reporting it."""
    if hasattr(worker, "set_accept_enabled"):
        worker.set_accept_enabled(False)
    for listener in worker.sockets:
        placeholder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        placeholder.bind("")  # Linux: an abstract address of the kernel's choosing
        placeholder.listen(1)
        placeholder.setblocking(False)
        os.dup2(placeholder.fileno(), listener.fileno(), inheritable=False)
        placeholder.close()
