"""`make run` and `make run-edge` run once per metrics directory: a second start while one runs
refuses at once, with one line, before it touches anything (the running one's metrics samples,
its log, its database, its nginx files); a crashed one leaves nothing that blocks the next.
The Makefile targets themselves, on free ports, against the test database."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bench.harness.environment import ROOT, free_port
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess

pytestmark = pytest.mark.stack

BIN = Path(sys.executable).parent
REFUSED = re.compile(
    r"^make (run|run-edge): another instance \(pid (\d+)\) is running on the metrics directory (\S+): "
    r"stop it first, or give this one its own METRICS_DIR, BIND and METRICS_BIND$"
)


def make(target: str, metrics_dir: Path) -> list[str]:
    # -o install: the venv is the one running the tests (BIN), not a .venv to create.
    return ["make", "--no-print-directory", "-o", "install", target, f"BIN={BIN}", f"METRICS_DIR={metrics_dir}"]


def own_lines(output: str) -> list[str]:
    """What the launcher printed, without make's own notices (`make: *** [Makefile:..] Error 1`)."""
    return [line for line in output.splitlines() if line and not line.startswith(("make: ", "make["))]


def samples(metrics_dir: Path) -> dict[str, int]:
    """The metrics directory's files by name, with their inode: a wiped and refilled directory
    has other inodes even where it has the same names."""
    return {path.name: path.stat().st_ino for path in metrics_dir.iterdir()}


def requests_counted(metrics_url: str) -> float:
    text = requests.get(metrics_url, timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("flask_http_request_total{") and 'status="200"' in line
    )


@pytest.fixture
def instance(migrated_database, tmp_path):
    """`make run` serving: its environment, ports, metrics dir and log, and the process."""
    bind, metrics_bind = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "FLASK_ENV": "development",
        "DB_URI": migrated_database(f"make_run_{tmp_path.name[-8:].lower()}".replace("-", "_")),
        "DATA_DIR": str(tmp_path / "data"),
        "LOG_DIR": str(tmp_path / "logs"),
        "BIND": bind,
        "METRICS_BIND": metrics_bind,
        "EDGE_BIND": f"127.0.0.1:{free_port()}",
        "WEB_CONCURRENCY": "2",
    }
    metrics_dir = tmp_path / "metrics"
    process = ManagedProcess(
        make("run", metrics_dir),
        env=env,
        log_path=tmp_path / "first.out",
        name="make run",
        ready_url=f"http://{bind}/healthz",
    )
    with process:
        yield type(
            "Instance",
            (),
            {
                "process": process,
                "env": env,
                "url": f"http://{bind}",
                "metrics_url": f"http://{metrics_bind}/metrics",
                "metrics_dir": metrics_dir,
                "log": tmp_path / "logs" / "app.log",
                "tmp": tmp_path,
            },
        )


def test_make_run_never_says_metrics_are_off(instance):
    """Its migration step runs with metrics off on purpose (it serves nothing): a line saying
    "metrics recording off" there read as if the server's metrics were off."""
    assert requests.get(instance.url + "/healthz", timeout=10).status_code == 200
    said = instance.process.output() + instance.log.read_text()
    assert "PostgresqlImpl" in said, said[-2000:]  # the migration step ran and logged
    assert "recording off" not in said and "records no metrics" not in said


def master_pid(instance) -> int:
    """The gunicorn master's pid, from its own "Listening at" line in the log."""
    for line in instance.log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("message", "").startswith("Listening at: ") and instance.env["BIND"] in entry["message"]:
            return entry["pid"]
    raise AssertionError(f"no 'Listening at' line in {instance.log}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def second_start(instance, target: str, **env) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    run = subprocess.run(
        make(target, instance.metrics_dir),
        cwd=ROOT,
        env={**instance.env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return run, time.monotonic() - started


@pytest.mark.parametrize("target", ["run", "run-edge"])
def test_a_second_start_refuses_and_touches_nothing(instance, target):
    for _ in range(5):
        assert requests.get(instance.url + "/books/", timeout=10).status_code == 200
    counted = wait_for(
        lambda: requests_counted(instance.metrics_url) >= 5 and requests_counted(instance.metrics_url),
        "the first instance's requests in its metrics",
    )
    master = master_pid(instance)
    before = samples(instance.metrics_dir)
    assert any(name.endswith(".db") for name in before), before
    log_before = instance.log.read_text()
    pids = {json.loads(line)["pid"] for line in log_before.splitlines()}  # the master and its workers
    assert master in pids and len(pids) >= 3

    run, seconds = second_start(instance, target)

    lines = own_lines(run.stdout + run.stderr)
    print(f"\nsecond `make {target}`: exit {run.returncode} after {seconds:.2f} s: {lines}")
    assert run.returncode != 0
    assert len(lines) == 1, lines
    refused = REFUSED.match(lines[0])
    assert refused, lines[0]
    assert refused.group(1) == target and int(refused.group(2)) == master
    assert Path(refused.group(3)) == instance.metrics_dir.resolve()
    assert seconds < 15, seconds

    # Untouched: the same sample files (same inodes), the count kept, no line of the second in
    # the first's log, no nginx files rendered.
    after = samples(instance.metrics_dir)
    assert {name: inode for name, inode in after.items() if name in before} == before
    assert requests_counted(instance.metrics_url) >= counted
    assert requests.get(instance.url + "/healthz", timeout=10).status_code == 200
    added = instance.log.read_text()[len(log_before) :].splitlines()
    assert [line for line in added if json.loads(line).get("pid") not in pids] == []
    assert not (instance.tmp / "data" / "edge").exists()


def test_a_port_in_use_is_refused_before_anything(instance, tmp_path):
    """Another metrics directory but the running one's BIND: refused with one line, before the
    migrations, the wipe or gunicorn's bind retries."""
    other = tmp_path / "other-metrics"
    other.mkdir()
    (other / "keep.db").write_text("not ours to wipe")
    run = subprocess.run(
        make("run", other),
        cwd=ROOT,
        env={**instance.env, "METRICS_BIND": f"127.0.0.1:{free_port()}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = own_lines(run.stdout + run.stderr)
    assert run.returncode != 0
    assert lines == [
        f"make run: BIND {instance.env['BIND']} is in use by another process: stop it, or set BIND to a free address"
    ]
    assert (other / "keep.db").read_text() == "not ours to wipe"


def test_a_crashed_instance_leaves_nothing_that_blocks_the_next(instance):
    """SIGKILL to the whole first instance (make, the master, its workers): the kernel drops the
    lock with the processes, and the next `make run` starts, wiping the dead one's samples."""
    master = master_pid(instance)
    os.killpg(instance.process.pid, signal.SIGKILL)
    wait_for(lambda: not alive(master), "the killed master to be gone")
    stale = samples(instance.metrics_dir)
    second = ManagedProcess(
        make("run", instance.metrics_dir),
        env=instance.env,
        log_path=instance.tmp / "second.out",
        name="make run (after a crash)",
        ready_url=instance.url + "/healthz",
    )
    with second:
        assert requests.get(instance.url + "/books/", timeout=10).status_code == 200
        assert not set(samples(instance.metrics_dir).items()) & set(stale.items())
