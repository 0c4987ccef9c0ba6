"""Log shipping as deployed (deploy/rsyslog/, docs/logging.md): an app host's forwarder and the log
host's central receiver, each its own rsyslogd in the foreground on the repo's config file as it
is. What differs from a server (the file to follow, the directories, loopback ports, the host
name) is in the environment, where the systemd units put it too; nothing needs root. Ready when
rsyslogd says READY=1 (as under the units' Type=notify; the receiver also once its port
listens), stopped by PID; `kill()` is a crash, and `start()` again is the restart after it.

    with shipping({"app-1": stack.log_file}, tmp) as receiver:   # central stream: tmp/central/app.log
        ...   # every line the app writes reaches receiver.combined and receiver.host_file("app-1")

or the two halves by hand (CentralReceiver, then a Forwarder per app log file, as the tests do).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import psutil

from bench.harness.environment import ROOT, free_port
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess

RSYSLOGD = Path("/usr/sbin/rsyslogd")
LOGROTATE = Path("/usr/sbin/logrotate")
RSYSLOG_DIR = ROOT / "deploy" / "rsyslog"
FORWARD_CONF = RSYSLOG_DIR / "forward.conf"
CENTRAL_CONF = RSYSLOG_DIR / "central.conf"
CENTRAL_LINES = RSYSLOG_DIR / "central_lines.py"
LOGROTATE_CENTRAL = RSYSLOG_DIR / "logrotate-central"
MISSING = "rsyslog is not installed: apt-get install rsyslog rsyslog-relp (Debian/Ubuntu; .ci/system-deps.sh does)"
QUEUE_NAME = "to_log_host"  # forward.conf's queue.filename


def installed() -> bool:
    return RSYSLOGD.exists()


class Rsyslogd(ManagedProcess):
    """`rsyslogd -n -f config -i pidfile` with `settings` in its environment, its pid file and
    output under `workdir`."""

    name = "rsyslogd"
    ready_timeout = 30.0
    stop_timeout = 15.0

    def __init__(self, config: Path, settings: dict[str, str], workdir: Path) -> None:
        if not RSYSLOGD.exists():
            raise RuntimeError(MISSING)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.pid_file = self.workdir / "rsyslogd.pid"
        self._notify_name = f"flaskapi-rsyslogd-{uuid.uuid4().hex}"  # abstract: no path length limit
        super().__init__(
            [RSYSLOGD, "-n", "-f", config, "-i", self.pid_file],
            log_path=self.workdir / "rsyslogd.out",
            env={**os.environ, **settings, "NOTIFY_SOCKET": "@" + self._notify_name},
        )

    def start(self, timeout: float | None = None) -> Rsyslogd:
        """Start it (again, once it has exited: the restart after `kill()`), and return once it
        told READY=1 and `ready()` holds."""
        if self.process is not None and self.process.poll() is not None:
            self.process = None
        timeout = self.ready_timeout if timeout is None else timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind("\0" + self._notify_name)
            notify.setblocking(False)
            super().start()

            def told_ready() -> bool:
                if self.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.poll()}: {self.output()[-3000:]}")
                with contextlib.suppress(BlockingIOError):
                    return b"READY=1" in notify.recv(4096)
                return False

            try:
                wait_for(told_ready, f"{self.name} to tell READY=1", timeout)
                wait_for(self.ready, f"{self.name} to be ready", timeout)
            except (RuntimeError, AssertionError):
                self.stop()
                raise
        return self

    def ready(self) -> bool:
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer: nothing is flushed, nothing is saved."""
        os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(10)


class Forwarder(Rsyslogd):
    """An app host's shipper (deploy/rsyslog/forward.conf): follows `log_file` and ships every
    line to the receiver at `target` ("host:port"), as `hostname`. Its position in the file and
    its queue on disk are under `workdir`/state (`queue_bytes()`)."""

    name = "forwarder"

    def __init__(
        self, log_file: Path, *, target: str, hostname: str, workdir: Path, config: Path = FORWARD_CONF
    ) -> None:
        """`config`: another forward.conf (a test's TLS variant)."""
        self.hostname = hostname
        self.state_dir = Path(workdir) / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        host, _, port = target.rpartition(":")
        settings = {
            "LOGSHIP_FILE": str(log_file),
            "LOGSHIP_ROTATED": f"{log_file}.*[0-9]",
            "LOGSHIP_STATE_DIR": str(self.state_dir),
            "LOGSHIP_HOSTNAME": hostname,
            "LOG_HOST": host,
            "LOG_HOST_PORT": port,
        }
        super().__init__(config, settings, workdir)
        self.name = f"forwarder {hostname}"

    def queue_bytes(self) -> int:
        """The size of its queue's files on disk now (0 while everything fits in memory)."""
        total = 0
        for path in self.state_dir.glob(QUEUE_NAME + ".*"):
            with contextlib.suppress(FileNotFoundError):  # rsyslog deletes a file it has sent
                total += path.stat().st_size
        return total


class CentralReceiver(Rsyslogd):
    """The log host's receiver (deploy/rsyslog/central.conf) on a loopback port (`target`),
    writing `central_dir`/app.log (`combined`), `central_dir`/hosts/<host>/app.log
    (`host_file(host)`) and `central_dir`/duplicates.log (`duplicates`). `port`: a given one, to
    start a second receiver where the first one was; `config`: another central.conf."""

    name = "central receiver"

    def __init__(
        self,
        central_dir: Path,
        *,
        workdir: Path | None = None,
        port: int | None = None,
        config: Path = CENTRAL_CONF,
    ) -> None:
        self.central_dir = Path(central_dir)
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        workdir = (
            Path(workdir) if workdir is not None else self.central_dir.parent / (self.central_dir.name + "-rsyslog")
        )
        state_dir = workdir / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "CENTRAL_LOG_DIR": str(self.central_dir),
            "CENTRAL_STATE_DIR": str(state_dir),
            "CENTRAL_LISTEN": "127.0.0.1",
            "CENTRAL_PORT": str(self.port),
            "CENTRAL_LINES": str(CENTRAL_LINES),
        }
        super().__init__(config, settings, workdir)
        self.combined = self.central_dir / "app.log"
        self.duplicates = self.central_dir / "duplicates.log"

    def host_file(self, host: str) -> Path:
        return self.central_dir / "hosts" / host / "app.log"

    def ready(self) -> bool:
        """Its RELP port listens (imrelp opens it in its own thread, after READY=1)."""
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
            for c in psutil.Process(self.pid).net_connections(kind="tcp")
        )

    def rotate(self, workdir: Path) -> subprocess.CompletedProcess:
        """Rotate the central files now, as the log host's daily logrotate run does
        (deploy/rsyslog/logrotate-central, forced, as the current user), HUP included."""
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "logrotate.conf"
        config.write_text(render_logrotate(self.central_dir, self.pid_file))
        return subprocess.run(
            [LOGROTATE, "--force", "--state", workdir / "logrotate.state", config],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )


def render_logrotate(central_dir: Path, pid_file: Path) -> str:
    """deploy/rsyslog/logrotate-central for files under `central_dir` and the rsyslogd of
    `pid_file`, rotated by whoever runs logrotate (its `su` line dropped): both paths must appear
    in the file, or it drifted from what this renders."""
    text = LOGROTATE_CENTRAL.read_text()
    for written, here in (
        ("/var/log/flaskapi-central", str(central_dir)),
        ("/run/flaskapi-loghost/rsyslogd.pid", str(pid_file)),
    ):
        if written not in text:
            raise ValueError(f"{LOGROTATE_CENTRAL.name}: no {written}")
        text = text.replace(written, here)
    lines = [line for line in text.splitlines() if not line.strip().startswith("su ")]
    if len(lines) != len(text.splitlines()) - 1:
        raise ValueError(f"{LOGROTATE_CENTRAL.name}: expected one su line")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def shipping(log_files: dict[str, Path], workdir: Path):
    """A central receiver writing `workdir`/central, and one forwarder per {host name: app log
    file} (the file need not exist yet), all stopped on exit; yields the receiver, which carries
    the forwarders by host name (`forwarders`)."""
    with contextlib.ExitStack() as started:
        receiver = started.enter_context(CentralReceiver(Path(workdir) / "central"))
        receiver.forwarders = {}
        for host, log_file in log_files.items():
            forwarder = Forwarder(
                log_file, target=receiver.target, hostname=host, workdir=Path(workdir) / f"ship-{host}"
            )
            receiver.forwarders[host] = started.enter_context(forwarder)
        yield receiver
