"""The service as it is deployed: gunicorn with deploy/gunicorn.conf.py (the file the systemd
unit and `make run` use), on free loopback ports for the API and the master's metrics, with
the private, empty multiprocess metrics directory a launcher must give every start."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.harness.environment import ROOT, free_port, stack_env
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from bench.harness.scrape import metric, scrape

GUNICORN = Path(sys.executable).parent / "gunicorn"
CONFIG = ROOT / "deploy" / "gunicorn.conf.py"


class Gunicorn(ManagedProcess):
    """gunicorn as a child process group on free loopback ports, ready when /healthz answers."""

    name = "gunicorn"
    stop_timeout = 20.0

    def __init__(
        self,
        env: dict[str, str],
        *,
        workers: int | None = 3,
        log_path: Path,
        port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        """`env` over ours; `workers=None`: as many as deploy/gunicorn.conf.py (WEB_CONCURRENCY
        or its default) says. `port`, `metrics_port`: the ones of an instance started again where
        nginx and Prometheus look for it (default: free ones)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = metrics_port or free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        # As a launcher must: a fresh, empty multiprocess metrics directory for every start.
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="metrics-", dir=log_path.parent))
        full_env = {
            **os.environ,
            **env,
            "BIND": f"127.0.0.1:{self.port}",
            "METRICS_BIND": f"127.0.0.1:{self.metrics_port}",
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        self.workers = workers
        if workers is not None:
            full_env["WEB_CONCURRENCY"] = str(workers)
        super().__init__([GUNICORN, "-c", CONFIG], env=full_env, log_path=log_path, ready_url=self.url + "/healthz")

    def wait_for_workers(self, count: int | None = None, what: str = "") -> None:
        """Until the master reports `count` live workers (default: the number asked for). Ready
        means one worker answered /healthz; the master spawns the others one after another."""
        count = self.workers if count is None else count
        wait_for(
            lambda: metric(scrape(self.metrics_url), "flaskapi_workers_alive") == count,
            what or f"{count} workers alive",
        )

    def stop(self, timeout: float | None = None) -> int | None:
        code = super().stop(timeout)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)  # as systemd's RuntimeDirectory is
        return code


@contextlib.contextmanager
def serving(uri: str, data_dir: Path, *, workers: int = 3, **env: str):
    """A production-mode stack on database `uri`, its data and logs under `data_dir`, yielded once
    every worker is up: what the real-stack test modules share. Logs go to files only unless
    `LOG_CONSOLE` is given. The stack carries `data_dir`, `db_uri` and `log_file` (app.log)."""
    settings = stack_env(uri, data_dir, **{"LOG_CONSOLE": "0", **env})
    with Gunicorn(settings, workers=workers, log_path=data_dir / "gunicorn.out") as stack:
        stack.wait_for_workers()
        stack.data_dir = data_dir
        stack.db_uri = settings["DB_URI"]
        stack.log_file = data_dir / "logs" / "app.log"
        yield stack
