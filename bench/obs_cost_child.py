"""One variant of bench/obs_cost.py's in-process mode: the app built as a gunicorn worker has it,
serving the requests it is asked for and saying what they cost in CPU.

    python bench/obs_cost_child.py list|create     (started by bench.obs_cost, settings in the environment)

Run as a script, from the tree to measure (its cwd and PYTHONPATH): obs_cost can run the same
variants from another checkout (`--baseline`) side by side, and that checkout's `service` is
what this imports. It imports nothing of `bench` for the same reason.

Protocol: prints `ready` once the app is built; then for every line with a request count on
stdin, serves that many and prints `<CPU seconds> <wall seconds>`. The CPU is the process's
(every thread: the request thread, and the sampler and log watcher, whose per-second work is
noise against a round's), so a request's whole cost is in it. A count followed by `measured`
(`200 measured`) serves each request inside `operator.call`, the C function bench/obs_instructions.py
tells callgrind to count instructions in (`--toggle-collect=_operator_call`): the request
thread's work and nothing of the start-up, the warm-up or the other threads.
"""

from __future__ import annotations

import io
import operator
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

CREATE_BODY = b'{"title": "benchmark book"}'


def build_app():
    from service.observability import sample_files

    sample_files.install()  # as deploy/gunicorn.conf.py does, before any metric exists
    from service import create_app
    from service.observability import metrics

    app = create_app()
    if metrics.enabled(app.config["APP_SETTINGS"]):
        metrics.worker_started()  # as gunicorn's post_fork: sample files, pool capacity, sampler
    return app


def request_maker(app, kind: str):
    """(a function returning a fresh environ for one request, the status it must get)."""
    from werkzeug.test import EnvironBuilder

    if kind == "create":
        client = app.test_client()
        creds = {"email": f"obs-{os.getpid()}-{time.time_ns()}@example.com", "password": "bench-password"}
        client.post("/auth/register", json=creds)
        token = client.post("/auth/login", json=creds).get_json()["token"]
        builder = EnvironBuilder(
            path="/books/",
            method="POST",
            data=CREATE_BODY,
            content_type="application/json",
            headers={"Authorization": f"Bearer {token}"},
        )
        body, expected = CREATE_BODY, "201"
    else:
        builder = EnvironBuilder(path="/books/")
        body, expected = b"", "200"
    template = builder.get_environ()
    return (lambda: {**template, "wsgi.input": io.BytesIO(body)}), expected


def main(kind: str) -> None:
    app = build_app()
    make_environ, expected = request_maker(app, kind)

    def serve() -> None:
        status = []
        body = app(make_environ(), lambda code, headers, exc_info=None: status.append(code))
        try:
            for _ in body:
                pass
        finally:
            if hasattr(body, "close"):
                body.close()
        if not status[0].startswith(expected):
            raise RuntimeError(f"{status[0]} where {expected} was expected")

    pool = ThreadPoolExecutor(1, thread_name_prefix="request")  # gthread hands each request to its pool
    print("ready", flush=True)
    for line in sys.stdin:
        count, _, measured = line.partition(" ")
        requests = int(count)
        task = (operator.call, serve) if measured.strip() == "measured" else (serve,)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests):
            pool.submit(*task).result()
        print(f"{time.process_time() - cpu} {time.perf_counter() - wall}", flush=True)


if __name__ == "__main__":
    del sys.path[0]  # this script's folder (bench/) is no import root; the tree's is, from PYTHONPATH
    main(sys.argv[1])
