"""Several app instances behind one nginx, as N app hosts are deployed (docs/deployment.md): each
a gunicorn of its own (deploy/gunicorn.conf.py, its own ports, metrics directory, data and logs,
as a host has), all on one database and one JWT key (a token from one instance is good on every
other), nginx's upstream listing them all with the site's health checks; and the file_sd target
file that makes Prometheus find each instance with its `host` (app-1, app-2, ...), as
monitoring/targets/flaskapi.yml does for a deployment.

A context manager; every process is stopped by PID. `kill` and `restart` are an instance dying
(its master's whole process group SIGKILLed, as a host losing power) and coming back on the
same ports, where nginx and Prometheus still look for it."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil

from bench.harness import exporters
from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.nginx import Nginx
from bench.harness.polling import wait_for


class Fleet:
    """`instances` gunicorns of `workers` workers on database `uri` behind one nginx, everything
    under `workdir` (instance i's data, logs and output in workdir/app-i, nginx's in
    workdir/nginx). `env`: settings for every instance (over stack_env's production ones);
    `nginx_overrides`: directives of the site set to other values (bench/harness/nginx.py)."""

    def __init__(
        self,
        workdir: Path,
        uri: str,
        *,
        instances: int = 2,
        workers: int = 2,
        nginx_overrides: dict[str, str] | None = None,
        **env: str,
    ) -> None:
        if instances < 1:
            raise ValueError("a fleet needs at least one instance")
        self.workdir = Path(workdir)
        self.workers = workers
        self.nginx_overrides = nginx_overrides
        self.settings = stack_env(uri, self.workdir, **{"LOG_CONSOLE": "0", **env})  # one key for all
        self.names = [f"app-{i}" for i in range(1, instances + 1)]
        self.instances: dict[str, Gunicorn] = {}
        self.nginx: Nginx | None = None
        self._running = contextlib.ExitStack()

    def _gunicorn(self, name: str, port: int | None = None, metrics_port: int | None = None) -> Gunicorn:
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        settings = {**self.settings, "DATA_DIR": str(home / "data"), "LOG_DIR": str(home / "logs")}
        return Gunicorn(
            settings, workers=self.workers, log_path=home / "gunicorn.out", port=port, metrics_port=metrics_port
        )

    def start(self) -> Fleet:
        """Every instance up with all its workers, then nginx in front of them."""
        try:
            for name in self.names:
                instance = self._gunicorn(name)
                self.instances[name] = instance
                self._running.callback(lambda name=name: self.instances[name].stop())
                instance.start()
                instance.wait_for_workers(what=f"{name}'s {self.workers} workers")
            self.nginx = Nginx(
                self.workdir / "nginx", upstream=list(self.upstreams.values()), overrides=self.nginx_overrides
            )
            self._running.callback(self.nginx.stop)
            self.nginx.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """nginx first (no request reaches an instance going away), then every instance."""
        self._running.close()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Where clients go: nginx."""
        return self.nginx.url

    @property
    def upstreams(self) -> dict[str, str]:
        """{host: the API's address}: nginx's upstream servers, as its access log's upstream_addr
        names them."""
        return {name: f"127.0.0.1:{instance.port}" for name, instance in self.instances.items()}

    @property
    def targets(self) -> dict[str, str]:
        """{host: the metrics port's address}: what Prometheus scrapes (write_targets)."""
        return {name: f"127.0.0.1:{instance.metrics_port}" for name, instance in self.instances.items()}

    def write_targets(self, config_dir: Path) -> Path:
        """The `flaskapi` job's file_sd file under `config_dir` (where a Prometheus config is)."""
        return exporters.write_targets(config_dir, "flaskapi", self.targets)

    def kill(self, name: str) -> None:
        """SIGKILL to instance `name`'s process group (master and workers at once: nothing is
        drained, nothing said to nginx), returning once every process of it has exited (a zombie
        holds no socket: its workers are reaped by whoever inherited them, at its own pace)."""
        instance = self.instances[name]
        workers = psutil.Process(instance.pid).children(recursive=True)
        os.killpg(instance.pid, signal.SIGKILL)
        instance.process.wait(30)

        def exited(process: psutil.Process) -> bool:
            try:
                return process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: all(exited(worker) for worker in workers), f"every process of {name} gone")
        instance.stop()  # only cleans up (its metrics directory): it has exited

    def restart(self, name: str) -> Gunicorn:
        """Instance `name` started again on its ports (a fresh metrics directory, as every start
        has), returned once all its workers are up."""
        old = self.instances[name]
        if old.poll() is None:
            raise RuntimeError(f"{name} is still running")
        instance = self._gunicorn(name, port=old.port, metrics_port=old.metrics_port)
        self.instances[name] = instance
        instance.start()
        instance.wait_for_workers(what=f"{name}'s {self.workers} workers after its restart")
        return instance
