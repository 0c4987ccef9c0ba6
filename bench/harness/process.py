"""The one way a test or a benchmark runs a real process: in its own session (so a stop reaches
its children too and nothing is left behind), its output in a log file (to show when it fails),
ready when a URL answers 200 (failing at once if it exits first), and stopped by PID with a
timeout, then SIGKILL. A server is a short subclass: see gunicorn.py and prometheus.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import requests

from bench.harness import polling
from bench.harness.environment import ROOT


class ManagedProcess:
    """A child process in a session of its own, writing stdout and stderr to `log_path`.

    What differs per server is a class attribute, so a subclass sets only those and passes its
    argv (and the URL that answers 200 once it serves) to __init__:

    - `name`: how errors name it;
    - `ready_timeout`, `stop_timeout`: the default deadlines, in seconds;
    - `stop_signal`: what asks it to stop (SIGTERM; nginx: SIGQUIT, its graceful stop);
    - `kill_mode`, named after systemd's KillMode: "control-group" sends `stop_signal` to the
      whole process group; "mixed" sends it to the main process only, as systemd and docker
      stop a service, and SIGKILLs whatever is left of the group once that has exited.

    `env` is the whole environment (None: ours); the process starts in `cwd`, the repo root
    unless told otherwise. `log_path=None` leaves its output on our stdout and stderr (a launcher
    in a terminal, such as `make run-edge`); `output()` is then empty. `pass_fds`: descriptors
    it inherits (every other one is closed in it). A context manager: started on entry, stopped
    on exit.
    """

    name = "process"
    ready_timeout = 60.0
    stop_timeout = 15.0
    stop_signal = signal.SIGTERM
    kill_mode = "control-group"

    def __init__(
        self,
        argv,
        *,
        log_path: Path | None,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        ready_url: str | None = None,
        name: str | None = None,
        kill_mode: str | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.argv = [str(arg) for arg in argv]
        self.pass_fds = tuple(pass_fds)
        self.log_path = None if log_path is None else Path(log_path)
        self.env = env
        self.cwd = cwd
        self.ready_url = ready_url
        if name is not None:
            self.name = name
        if kill_mode is not None:
            self.kill_mode = kill_mode
        if self.kill_mode not in ("control-group", "mixed"):
            raise ValueError(f"kill_mode {self.kill_mode!r}: 'control-group' or 'mixed'")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float | None = None) -> ManagedProcess:
        """Start it; when it has a `ready_url`, return once that answers 200 (see wait_ready)."""
        if self.process is not None:
            raise RuntimeError(f"{self.name} was started already")
        if self.log_path is None:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, start_new_session=True, pass_fds=self.pass_fds
            )
        else:
            with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
                self.process = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=self.pass_fds,
                )
        if self.ready_url is not None:
            self.wait_ready(self.ready_url, timeout)
        return self

    def wait_ready(self, url: str | None = None, timeout: float | None = None) -> requests.Response:
        """Until `url` (by default `ready_url`) answers 200, that answer returned. If the process
        exits first, or `timeout` (by default `ready_timeout`) passes, it is stopped and
        RuntimeError raised with the end of its output."""
        try:
            return polling.wait_ready(
                self.process,
                url or self.ready_url,
                name=self.name,
                timeout=self.ready_timeout if timeout is None else timeout,
            )
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {self.output()[-3000:]}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Its exit status once it has exited, else None."""
        return self.process.poll()

    def output(self) -> str:
        """Everything it has written so far (stdout and stderr, interleaved as written)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop it by PID: `stop_signal` as `kill_mode` says, SIGKILL to the process group if it
        is still there after `timeout` (by default `stop_timeout`). Returns its exit status
        (None if it never started); calling it again only returns the status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            if self.kill_mode == "mixed":
                process.send_signal(self.stop_signal)
            else:
                os.killpg(process.pid, self.stop_signal)
            try:
                process.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        if self.kill_mode == "mixed":  # the rest of the group, as systemd's KillMode=mixed does
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self.process is None else f"pid {self.process.pid}"
        return f"<{type(self).__name__} {self.name} ({state})>"
