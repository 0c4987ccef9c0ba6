"""Start and stop the real processes (gunicorn with deploy/gunicorn.conf.py, Prometheus with
monitoring/prometheus.yml) on free loopback ports; used by the tests, `make demo` and `make bench`.
Every process is started in its own session and stopped by PID with a timeout."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"


def stack_env(uri: str, workdir: Path, **extra) -> dict[str, str]:
    """Settings for a production-mode stack on `uri`: real hashing cost, a fresh random key,
    data and logs under `workdir`."""
    return {"FLASK_ENV": "production", "DB_URI": uri, "JWT_SECRET_KEY": secrets.token_urlsafe(48),
            "DATA_DIR": str(workdir / "data"), "LOG_DIR": str(workdir / "logs"), **extra}


def locust_env(**extra) -> dict[str, str]:
    """The environment for a locust process: ours without PROMETHEUS_MULTIPROC_DIR (locust's own
    exporter uses prometheus_client, which must not write into a gunicorn's metrics dir)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text endpoint, as (name, labels, value)."""
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(response.text) for s in family.samples]


def metric(samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(value for n, have, value in samples
               if n == name and all(have.get(k) == v for k, v in labels.items()))


def has_metric(samples, name: str) -> bool:
    return any(n == name for n, _, _ in samples)


def worker_pids(samples) -> set[int]:
    """The pids of the live workers the master reports (one memory series each)."""
    return {int(have["pid"]) for n, have, _ in samples
            if n == "flaskapi_process_resident_memory_bytes" and have.get("role") == "worker"}


class Gunicorn:
    """gunicorn as a child process group on a free loopback port; always stopped by PID."""

    def __init__(self, env: dict[str, str], *, workers: int | None = 3, log_path: Path) -> None:
        """`workers=None`: as many as deploy/gunicorn.conf.py (WEB_CONCURRENCY or its default) says."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        # As a launcher must: a fresh, empty multiprocess metrics directory for every start.
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="metrics-", dir=log_path.parent))
        self.env = {**os.environ, **env, "BIND": f"127.0.0.1:{self.port}",
                    "METRICS_BIND": f"127.0.0.1:{self.metrics_port}",
                    "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        if workers is not None:
            self.env["WEB_CONCURRENCY"] = str(workers)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Gunicorn":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(GUNICORN), "-c", str(ROOT / "deploy" / "gunicorn.conf.py")],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_ready(self.process, self.url + "/healthz", timeout=timeout, name="gunicorn")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {self.output()[-3000:]}") from None
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int | None:
        code = stop_process(self.process, timeout)
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)  # as systemd's RuntimeDirectory is
        return code

    def __enter__(self) -> "Gunicorn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(process: subprocess.Popen, url: str, *, timeout: float, name: str) -> None:
    """Until `url` answers 200; fail at once if the process exits, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer {url} within {timeout}s")


def wait_for(predicate, what: str, timeout: float = 60, interval: float = 0.05):
    """Call `predicate()` until it returns something truthy, and return that; after `timeout`
    seconds raise AssertionError naming `what`. The deadline is generous on purpose: a poll
    returns as soon as the condition holds, so it costs nothing when things work, and a loaded
    machine gets its time. Exceptions from `predicate` propagate (to fail at once, e.g. when the
    process waited on has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_command(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command from the repo root in its own process group, stdout and stderr together;
    on timeout kill the whole group and raise with what it printed."""
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=10)
        raise TimeoutError(f"{' '.join(map(str, args))} did not finish within {timeout}s:\n{output[-3000:]}") from None
    return subprocess.CompletedProcess(args, process.returncode, output, None)


def stop_process(process: subprocess.Popen | None, timeout: float) -> int | None:
    """SIGTERM to the process group, SIGKILL if it is still there after `timeout`."""
    if process is None or process.poll() is not None:
        return process.returncode if process else None
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    return process.returncode


class Prometheus:
    """The real Prometheus binary with the repo's config and rules, its targets pointed at the
    given loopback ports and its intervals shortened for a short run."""

    BINARY = "/usr/bin/prometheus"

    def __init__(self, workdir: Path, *, targets: dict[str, str], interval: str = "5s") -> None:
        if not Path(self.BINARY).exists():
            raise RuntimeError("Prometheus is not installed: apt-get install prometheus "
                               "(Debian/Ubuntu; .ci/run installs it)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=interval, evaluation_interval=interval,
                                scrape_timeout=interval)
        config["rule_files"] = [str(ROOT / "monitoring" / rule) for rule in config.get("rule_files", [])]
        targets = {**targets, "prometheus": f"127.0.0.1:{self.port}"}
        for job in config["scrape_configs"]:
            job["scrape_interval"] = interval
            job["scrape_timeout"] = interval
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}] if job["job_name"] in targets else []
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Prometheus":
        self._log = open(self.workdir / "prometheus.out", "ab")
        self.process = subprocess.Popen(
            [self.BINARY, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(self.process, self.url + "/-/ready", timeout=timeout, name="prometheus")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        code = stop_process(self.process, timeout)
        if getattr(self, "_log", None):
            self._log.close()
        return code

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        response = requests.get(self.url + "/api/v1/query_range", timeout=30,
                                params={"query": expr, "start": start, "end": end, "step": step})
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        body = requests.get(self.url + "/api/v1/query", params=params, timeout=30).json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
