"""`make db-stop` (python -m service.devdb stop) on a real embedded Postgres in a private data
dir: it stops the server when no process holds it, prunes holders that died without removing
themselves (SIGKILL), and otherwise names the one still using it and exits non-zero."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from bench.harness.environment import ROOT
from service import devdb
from tests.conftest import eventually

HOLD = """
import sys
from pathlib import Path
from service import devdb
devdb.server(Path(sys.argv[1]), cleanup_mode=None)  # registers this pid, as the app and the CLI do
print("holding", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills us)
"""


def db_stop(data_dir: Path) -> subprocess.CompletedProcess:
    """As `make db-stop` runs it, on `data_dir` (the settings' DATA_DIR)."""
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    env.pop("DB_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "service.devdb", "stop"],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def holder(pgdata: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(pgdata)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "holding"
    return process


def postmaster(pgdata: Path) -> psutil.Process | None:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return None
    try:
        process = psutil.Process(int(pid_file.read_text().split()[0]))
    except psutil.NoSuchProcess:
        return None
    return process if process.status() != psutil.STATUS_ZOMBIE else None


def handles(pgdata: Path) -> list[int]:
    return json.loads((pgdata / devdb.HANDLES).read_text())


@pytest.fixture
def data_dir():
    """A private data dir in a short path (Unix socket paths are limited), its server stopped
    and removed after the test whatever happened."""
    path = Path(tempfile.mkdtemp(prefix="fadb-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    server = postmaster(path / "postgres")
    if server is not None:
        server.terminate()
        server.wait(30)
    shutil.rmtree(path, ignore_errors=True)


def test_db_stop_names_a_live_holder_prunes_a_killed_one_and_stops(data_dir):
    pgdata = devdb.pgdata_for(data_dir)
    first = holder(pgdata)  # starts the server
    second = holder(pgdata)
    try:
        server = postmaster(pgdata)
        assert server is not None
        assert sorted(handles(pgdata)) == sorted([first.pid, second.pid])

        # SIGKILL: `first` never removes itself; left unreaped it is a zombie, not a holder.
        first.send_signal(signal.SIGKILL)
        assert eventually(lambda: psutil.Process(first.pid).status(), psutil.STATUS_ZOMBIE) == psutil.STATUS_ZOMBIE
        refused = db_stop(data_dir)
        [line] = refused.stdout.splitlines()
        assert refused.returncode == 1, refused
        # its command line (a -c script here) shown on the one line, newlines escaped
        assert f"still used by pid {second.pid} (" in line and "\\nfrom service import devdb\\n" in line, line
        assert f"pruned dead pid {first.pid}" in line, line
        assert "not stopped" in line
        assert server.is_running() and handles(pgdata) == [second.pid]

        # The last holder SIGKILLed too: before, the server then never stopped (stop returned
        # silently while any pid was listed); now it is pruned and the server stops.
        second.send_signal(signal.SIGKILL)
        second.wait(30)
        stopped = db_stop(data_dir)
        [line] = stopped.stdout.splitlines()
        assert stopped.returncode == 0, stopped
        assert line.startswith(f"db-stop: stopped the embedded Postgres (pid {server.pid})"), line
        assert line.endswith(f"pruned dead pid {second.pid}"), line
        server.wait(30)
        assert postmaster(pgdata) is None and handles(pgdata) == []

        again = db_stop(data_dir)
        assert again.returncode == 0 and again.stdout.strip().endswith("is not running"), again
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
            process.wait(30)
            process.stdin.close()
            process.stdout.close()
