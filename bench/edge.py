"""`make run-edge`: the stack of `make run` with nginx in front, as deployed. gunicorn on BIND
(default 127.0.0.1:5000, deploy/gunicorn.conf.py), nginx on EDGE_BIND (default 127.0.0.1:8080)
from the project's own site (deploy/nginx/flaskapi.conf) rendered for loopback by
bench/harness/nginx.py: its config, pid, logs and temporary files under $DATA_DIR/edge/
(.data/edge/). gunicorn's log stays on this terminal; Ctrl-C (or SIGTERM, SIGHUP) stops nginx,
then gunicorn, each by PID with a timeout and SIGKILL after it: nothing is left running. If
either exits, the other is stopped too.

It starts as `make run` does (bench/serve.py): the metrics directory's lock first (a second
`make run` or `make run-edge` on it stops with one line, before touching anything), free
BIND, METRICS_BIND and EDGE_BIND, the migrations, an empty metrics directory; gunicorn inherits
the lock, so it lasts as long as either process that could write there:

    python -m bench.edge --check     one line and exit status 1 when nginx is not installed
    python -m bench.edge             serve (NGINX: the nginx binary, default found on PATH)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from bench.harness.environment import ROOT
from bench.harness.gunicorn import CONFIG, GUNICORN
from bench.harness.nginx import Nginx, nginx_binary
from bench.harness.process import ManagedProcess
from bench.serve import start

MISSING = "make run-edge needs nginx, which is not installed: apt-get install nginx (Debian/Ubuntu)"


class StopRequestedError(Exception):
    """Raised by the signal handler: stop everything, then exit 0."""


def _stop(signum, _frame):
    raise StopRequestedError(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that nginx is installed")
    args = parser.parse_args(argv)
    if nginx_binary() is None:
        print(MISSING, file=sys.stderr)
        return 1
    if args.check:
        return 0

    bind = os.environ.get("BIND") or "127.0.0.1:5000"
    edge_bind = os.environ.get("EDGE_BIND") or "127.0.0.1:8080"
    edge_dir = Path(os.environ.get("DATA_DIR") or ROOT / ".data") / "edge"
    lock, _metrics_dir = start("run-edge", EDGE_BIND=edge_bind)
    # Behind nginx the client's address comes from X-Forwarded-For (one hop), as in production.
    env = {**os.environ, "BIND": bind, "TRUSTED_PROXIES": os.environ.get("TRUSTED_PROXIES") or "1"}
    gunicorn = ManagedProcess(
        [GUNICORN, "-c", CONFIG],
        env=env,
        log_path=None,
        name="gunicorn",
        ready_url=f"http://{bind}/healthz",
        pass_fds=(lock,),
    )
    nginx = Nginx(edge_dir, upstream=bind, listen=edge_bind)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    code = 0
    try:
        gunicorn.start()
        nginx.start()
        print(
            f"edge: nginx (pid {nginx.pid}) on http://{edge_bind} -> gunicorn (pid {gunicorn.pid}) on http://{bind}; "
            f"nginx's config and logs in {edge_dir}; Ctrl-C stops both",
            flush=True,
        )
        while gunicorn.poll() is None and nginx.poll() is None:
            time.sleep(0.5)
        for process in (gunicorn, nginx):
            if process.poll() is not None:
                print(f"edge: {process.name} exited with {process.poll()}; stopping the rest", file=sys.stderr)
        code = 1
    except StopRequestedError as stop:
        print(f"edge: {stop}, stopping nginx and gunicorn", file=sys.stderr, flush=True)
    except (RuntimeError, AssertionError) as exc:  # one of them did not start: its output says why
        print(f"edge: {exc}", file=sys.stderr)
        code = 1
    finally:
        # A second Ctrl-C must not cut the stops short (and leave a process behind): each is
        # bounded by its own timeout, then SIGKILL.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        nginx.stop()
        gunicorn.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
