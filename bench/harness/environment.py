"""Where the processes run and with what: the checkout's root, a free loopback port, and the
environments of a production-mode stack and of a locust process."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on now: every server gets its own, so runs never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_env(uri: str, workdir: Path, **extra) -> dict[str, str]:
    """Settings for a production-mode stack on `uri`: real hashing cost, a fresh random key,
    data and logs under `workdir`."""
    return {
        "FLASK_ENV": "production",
        "DB_URI": uri,
        "JWT_SECRET_KEY": secrets.token_urlsafe(48),
        "DATA_DIR": str(workdir / "data"),
        "LOG_DIR": str(workdir / "logs"),
        **extra,
    }


def locust_command(
    host: str,
    *,
    users: int,
    rate: float | str,
    seconds: float | None = None,
    locustfile: Path = ROOT / "locustfile.py",
    user_classes: tuple[str, ...] = (),
    stop_timeout: float = 5,
    processes: int = 1,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A headless locust run against `host`, as the tests, the demo and the benchmarks start it:
    only the summary printed, failures reported but not the exit code (callers judge them), a
    stop timeout for users mid-request. No `seconds`: it runs until stopped. `processes` > 1:
    locust's master forks that many workers (one process tops out near a core) and shares the
    users among them; the master alone serves the metrics and writes the results."""
    argv = [sys.executable, "-m", "locust", "-f", str(locustfile), *user_classes, "--headless"]
    argv += ["-u", str(users), "-r", str(rate), "--host", host, "--only-summary"]
    argv += ["--exit-code-on-error", "0", "--stop-timeout", f"{stop_timeout:g}"]
    if seconds is not None:
        argv += ["-t", f"{int(seconds)}s"]
    if processes > 1:
        argv += ["--processes", str(processes)]
    return argv + list(extra)


def locust_env(**extra) -> dict[str, str]:
    """The environment for a locust process: ours without PROMETHEUS_MULTIPROC_DIR (locust's own
    exporter uses prometheus_client, which must not write into a gunicorn's metrics dir)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, **extra}
