"""`make run`: the API as deployed (gunicorn with deploy/gunicorn.conf.py), once per metrics
directory. `make run-edge` (bench/edge.py) starts the same way.

Before it touches anything, the launcher takes an exclusive lock on `<metrics dir>.lock`
(`.data/metrics.lock`, flock): while another instance holds it, this one stops with one line,
so it never wipes the running one's samples, runs migrations under it or writes gunicorn's bind
errors into its log. It then checks that BIND and METRICS_BIND are free (one line again if not),
applies the migrations, empties the metrics directory and becomes gunicorn (exec): the master,
and the workers it forks, keep the lock's descriptor, so the lock lasts exactly as long as a
process that can write samples there. The kernel drops it with the last of them, so a crashed
instance leaves nothing that blocks the next start (its stale samples are wiped then).

    python -m bench.serve     PROMETHEUS_MULTIPROC_DIR: the metrics directory (the Makefile
                              sets it from METRICS_DIR, default .data/metrics)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from bench.harness.environment import ROOT
from bench.harness.gunicorn import CONFIG, GUNICORN


class RefusedError(Exception):
    """This start must not go on; the message (one line) says why."""


def metrics_directory() -> Path:
    """PROMETHEUS_MULTIPROC_DIR (set to it in our environment when unset), absolute."""
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or ROOT / ".data" / "metrics").resolve()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return metrics_dir


def claim(metrics_dir: Path) -> int:
    """Lock `<metrics_dir>.lock` (exclusive, without waiting) and write our pid in it; return the
    descriptor, inheritable, so a process this one becomes (exec) or starts with it keeps the lock."""
    lock_path = metrics_dir.with_name(metrics_dir.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RefusedError(
            f"another instance (pid {holder}) is running on the metrics directory {metrics_dir}: "
            "stop it first, or give this one its own METRICS_DIR, BIND and METRICS_BIND"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.set_inheritable(fd, True)
    return fd


def check_free(addresses: dict[str, str]) -> None:
    """Each `host:port` (by the setting that names it) must have no listener: one line naming the
    first that has. Bound with SO_REUSEADDR, as gunicorn binds, so connections left in TIME_WAIT
    by an instance that just stopped do not count. (A check, not a reservation: the lock is what
    keeps two instances apart; this only turns another program's port into one clear line.)"""
    for name, address in addresses.items():
        host, _, port = address.rpartition(":")
        if address.startswith("unix:") or not port.isdigit():
            continue
        host = host.strip("[]") or "0.0.0.0"  # noqa: S104 (only probed, never served)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, int(port)))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise RefusedError(
                        f"{name} {address} is in use by another process: stop it, or set {name} to a free address"
                    ) from None
                # Any other failure (an address not on this host) is gunicorn's to report.


def service_addresses(**extra: str) -> dict[str, str]:
    """BIND and, when metrics are on, METRICS_BIND as gunicorn will read them (the latter through
    the settings, which also read .env), plus `extra`."""
    from service.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise RefusedError(f"configuration error: {exc}") from None
    addresses = {"BIND": os.environ.get("BIND") or "127.0.0.1:5000"}
    if settings.metrics_enabled:
        addresses["METRICS_BIND"] = settings.metrics_bind
    return {**addresses, **extra}


def prepare(metrics_dir: Path) -> None:
    """With the lock held: the migrations (embedded Postgres unless DB_URI is set), then an empty
    metrics directory, as deploy/gunicorn.conf.py requires."""
    # Without the metrics directory and with metrics off: the migration's process is no worker,
    # its samples no one's, and its log says nothing about metrics (the server's are on).
    env = {name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"}
    env["METRICS_ENABLED"] = "0"
    migrate = subprocess.run([sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=env, check=False)
    if migrate.returncode != 0:
        raise SystemExit(migrate.returncode)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(metrics_dir)
    metrics_dir.mkdir(parents=True)


def start(target: str, **extra_addresses: str) -> tuple[int, Path]:
    """The start-up both targets share: lock, free addresses, migrations, empty metrics
    directory. Returns the lock's descriptor and the directory; one line and exit 1 if refused."""
    metrics_dir = metrics_directory()
    try:
        lock = claim(metrics_dir)
        check_free(service_addresses(**extra_addresses))
    except RefusedError as refused:
        print(f"make {target}: {refused}", file=sys.stderr)
        raise SystemExit(1) from None
    prepare(metrics_dir)
    return lock, metrics_dir


def main() -> None:
    start("run")
    os.chdir(ROOT)
    os.execv(GUNICORN, [str(GUNICORN), "-c", str(CONFIG)])  # noqa: S606 (our own venv's gunicorn, fixed argv)


if __name__ == "__main__":
    main()
