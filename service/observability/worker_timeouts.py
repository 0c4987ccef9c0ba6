"""A worker aborted for timeout: where each of its threads was, logged and sent to Sentry.

The master sends SIGABRT to a worker silent for GUNICORN_TIMEOUT; in the worker, gunicorn's
signal handler calls the `worker_abort` server hook (gunicorn_hooks.py). `report` runs there,
on the main thread, on top of whatever that thread was doing, and ends the process itself. It
takes the Python stack of every thread at that moment (`sys._current_frames`), with the request
id and trace id each one was serving (request_log.serving), and writes one ERROR line (event
`worker_timeout`) that is also a Sentry event carrying the stacks as its threads. Then a short,
bounded flush (the process is about to die, and the event would die with it) and `os._exit(1)`.

The master still reports the death itself (worker_exits.py: `cause=timeout`). What no hook can
see: a main thread blocked in a C call that does not return to Python on a signal (a sync
worker waiting inside a psycopg2 query) never runs the handler; the master kills it with
SIGKILL a second later, and only the master's report is left.
"""

from __future__ import annotations

import linecache
import logging
import os
import sys
import threading
from types import FrameType
from typing import Any

from service.observability import request_log

log = logging.getLogger("service.workers")

FLUSH_SECONDS = 1.0  # at most; never more than half the timeout (see `report`)


def report(worker) -> None:
    """The stacks of this worker's threads as a log line and a Sentry event (module doc)."""
    # The master kills a worker still silent at its next look (within a second): the heartbeat
    # gives this report a full timeout. The worker exits when the hook returns either way.
    worker.notify()
    threads = thread_stacks()
    serving = [t for t in threads if t["request_id"]]
    # One request in flight (a sync worker, or one stuck thread): the event is that request's,
    # in its trace, as its own log lines and error events are.
    only = serving[0] if len(serving) == 1 else None
    request_id = only["request_id"] if only else None
    # Grouped by where it hung: the innermost frame of the thread serving a request, else of
    # the thread the signal interrupted.
    culprit = next((t for t in threads if t["request_id"]), None) or next((t for t in threads if t["current"]), None)
    innermost = culprit["frames"][-1] if culprit and culprit["frames"] else {"file": "?", "function": "?"}

    import sentry_sdk

    from service.observability.sentry import flush, join_trace

    with sentry_sdk.new_scope() as scope:
        scope.set_tag("worker_pid", os.getpid())
        scope.set_tag("cause", "timeout")
        if request_id:
            scope.set_tag("request_id", request_id)
            scope.add_event_processor(lambda event, _hint: join_trace(event, only["trace"]))
        scope.fingerprint = ["gunicorn-worker-timeout", innermost["file"], innermost["function"]]
        scope.add_event_processor(_threads_interface)
        log.error(
            "worker %d timed out (silent for %ss): the master aborts it; stacks of its %d threads",
            os.getpid(),
            worker.cfg.timeout,
            len(threads),
            extra={
                "event": "worker_timeout",
                "worker_pid": os.getpid(),
                "request_id": request_id,
                "trace_id": only["trace_id"] if only else None,
                "request_ids": [t["request_id"] for t in serving],
                "trace_ids": [t["trace_id"] for t in serving],
                "threads": [{k: v for k, v in t.items() if k != "trace"} for t in threads],
            },
        )
    for handler in logging.getLogger().handlers:
        handler.flush()
    flush(min(FLUSH_SECONDS, worker.cfg.timeout / 2))
    # Exit here rather than return: gunicorn's handler would raise SystemExit into the view, and
    # its sync worker then answers the client its own HTML 500 (not the error shape; nginx
    # passes it through). Ended here, the connection closes unanswered, nginx answers its JSON
    # 502 (deploy/nginx/), and the SDK's exit flush (2 s more when Sentry is slow) is skipped.
    os._exit(1)


def thread_stacks() -> list[dict[str, Any]]:
    """Every thread of the process, oldest frame first; the calling thread from the frame the
    signal interrupted (the abort handler's own frames left out); with the request each serves
    (its id, its trace id, and the trace itself under `trace`, for the Sentry event)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    me = threading.get_ident()
    serving = dict(request_log.serving)
    stacks = []
    for ident, top in sys._current_frames().items():
        frames = [
            {
                "file": f.f_code.co_filename,
                "line": f.f_lineno,
                "function": f.f_code.co_name,
                "module": f.f_globals.get("__name__"),
                "code": linecache.getline(f.f_code.co_filename, f.f_lineno).strip(),
            }
            for f in _oldest_first(_interrupted(top) if ident == me else top)
        ]
        request_id, trace = serving.get(ident, (None, None))
        stacks.append(
            {
                "thread": names.get(ident, str(ident)),
                "thread_id": ident,
                "current": ident == me,
                "request_id": request_id,
                "trace_id": trace.trace_id if trace else None,
                "trace": trace,
                "frames": frames,
                "stack": "".join(
                    f'  File "{f["file"]}", line {f["line"]}, in {f["function"]}\n    {f["code"]}\n' for f in frames
                ),
            }
        )
    return stacks


def _interrupted(frame: FrameType | None) -> FrameType | None:
    """Below gunicorn's SIGABRT handler, if it is on this stack: what the thread was doing."""
    start = frame
    while frame is not None:
        if frame.f_code.co_name == "handle_abort" and frame.f_globals.get("__name__", "").startswith("gunicorn."):
            return frame.f_back
        frame = frame.f_back
    return start


def _oldest_first(frame: FrameType | None) -> list[FrameType]:
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return frames


def _threads_interface(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """The stacks as Sentry's `threads` interface (frames are not cut to ten there, as a list in
    `extra` would be); the copy the logging integration put in `extra` is dropped."""
    threads = (event.get("extra") or {}).pop("threads", None)
    if not threads:
        return event
    event["threads"] = {
        "values": [
            {
                "id": thread["thread_id"],
                "name": thread["thread"],
                "current": thread["current"],
                "crashed": bool(thread["request_id"]) or thread["current"],
                "stacktrace": {
                    "frames": [
                        {
                            "abs_path": f["file"],
                            "filename": f["file"],
                            "function": f["function"],
                            "module": f["module"],
                            "lineno": f["line"],
                            "context_line": f["code"],
                        }
                        for f in thread["frames"]
                    ]
                },
            }
            for thread in threads
        ]
    }
    return event
