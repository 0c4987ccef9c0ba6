"""What happens to the log file under a real gunicorn (master and workers share it): deleted,
replaced by another file, or on a disk that fills up and then has room again."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import psutil
import pytest
import requests

from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn, serving
from bench.harness.polling import wait_for
from bench.harness.scrape import has_metric, metric, scrape
from bench.harness.sentry_receiver import SentryReceiver

pytestmark = pytest.mark.stack

WORKERS = 2


def gunicorn_pids(stack) -> list[int]:
    master = psutil.Process(stack.pid)
    return [master.pid] + [child.pid for child in master.children()]


def holding(pids: list[int], identity: tuple[int, int]) -> list[int]:
    """The processes among `pids` with a descriptor open on the file (st_dev, st_ino)."""
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                info = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (info.st_dev, info.st_ino) == identity:
                found.append(pid)
                break
    return found


def identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def access_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        data = json.loads(line)
        if data.get("event") == "access":
            ids.add(data["request_id"])
    return ids


def send(stack, prefix: str, count: int, path: str = "/books/") -> list[str]:
    """`count` requests, each with its own request id; every one must be answered 200."""
    ids = [f"{prefix}-{i}-{uuid.uuid4().hex[:8]}" for i in range(count)]
    for request_id in ids:
        response = requests.get(stack.url + path, headers={"X-Request-ID": request_id}, timeout=10)
        assert response.status_code == 200, (response.status_code, response.text[:200])
    return ids


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    with serving(migrated_database("test_log_faults"), tmp_path_factory.mktemp("logfile"), workers=WORKERS) as stack:
        yield stack


def test_a_deleted_log_file_is_reopened_by_every_process(stack):
    send(stack, "before-delete", 5)
    deleted = identity(stack.log_file)
    pids = gunicorn_pids(stack)
    assert holding(pids, deleted) == pids  # the master and each worker write to it
    stack.log_file.unlink()
    deleted_at = time.monotonic()

    # Requests sent in the first second may still go to the deleted file (the path is looked at
    # once a second): send until one of them arrives in a new app.log.
    def one_arrived() -> bool:
        return bool(set(send(stack, "probe-delete", 1)) & access_ids(stack.log_file))

    wait_for(one_arrived, "an access line in a new app.log after deleting it", timeout=60, interval=0.2)
    # every process, the master too, which logs nothing here, lets go of the deleted file
    wait_for(lambda: not holding(pids, deleted), "every gunicorn process to close the deleted app.log", timeout=60)
    print(f"deleted app.log: every process reopened and let go of it in {time.monotonic() - deleted_at:.1f} s")
    ids = send(stack, "after-delete", 30)
    wait_for(lambda: set(ids) <= access_ids(stack.log_file), "every access line in the new app.log", timeout=30)
    assert set(holding(pids, identity(stack.log_file))) == set(pids)


def test_a_log_file_replaced_by_another_is_reopened_by_every_process(stack):
    send(stack, "before-replace", 5)
    old = identity(stack.log_file)
    pids = gunicorn_pids(stack)
    moved = stack.log_file.with_name("moved-away.log")
    os.rename(stack.log_file, moved)  # logrotate without copytruncate does this
    other = stack.log_file.with_name("incoming.log")
    other.write_text(json.dumps({"message": "the replacement's own first line"}) + "\n")
    os.rename(other, stack.log_file)
    replacement = identity(stack.log_file)

    wait_for(lambda: not holding(pids, old), "every gunicorn process to close the replaced app.log", timeout=60)
    assert set(holding(pids, replacement)) == set(pids)
    ids = send(stack, "after-replace", 30)
    wait_for(lambda: set(ids) <= access_ids(stack.log_file), "the access lines in the replacement", timeout=30)
    assert not set(ids) & access_ids(moved)
    assert stack.log_file.read_text().splitlines()[0] == json.dumps({"message": "the replacement's own first line"})
    # nothing was lost, and the series are there (at 0) for an alert to watch
    samples = scrape(stack.metrics_url)
    assert has_metric(samples, "flaskapi_log_write_errors_total")
    assert metric(samples, "flaskapi_log_write_errors_total", handler="file") == 0


# --- a full log disk --------------------------------------------------------------------------


@pytest.fixture
def small_log_disk(tmp_path):
    """A 256 KiB tmpfs as LOG_DIR (needs root or CAP_SYS_ADMIN); unmounted afterwards."""
    mount_point = tmp_path / "logs"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        problem = None if result.returncode == 0 else (result.stderr.strip() or f"exit status {result.returncode}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem is not None:
        reason = f"FULL-DISK TEST NOT RUN: cannot mount a tmpfs ({problem}); it needs root or CAP_SYS_ADMIN"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30, check=False).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30, check=False)


def fill(path: Path) -> int:
    """Write to `path` until the device is full; the bytes written."""
    size = 0
    with open(path, "wb", buffering=0) as filler:
        while True:
            try:
                size += filler.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return size


def test_a_full_log_disk_loses_lines_quietly_counts_them_and_recovers(migrated_database, small_log_disk, tmp_path):
    with SentryReceiver() as receiver:
        env = stack_env(
            migrated_database("test_log_full_disk"),
            tmp_path,
            LOG_DIR=str(small_log_disk),  # the console stays on: its stderr is where the reports go
            SENTRY_DSN=receiver.dsn,
            SENTRY_TRACES_SAMPLE_RATE="0",
        )
        with Gunicorn(env, workers=WORKERS, log_path=tmp_path / "gunicorn.out") as stack:
            stack.wait_for_workers()
            log = small_log_disk / "app.log"
            send(stack, "before-full", 5)
            filler = small_log_disk / "filler"
            fill(filler)

            lost_ids = send(stack, "while-full", 300)  # every request still answered 200
            wait_for(
                lambda: metric(scrape(stack.metrics_url), "flaskapi_log_write_errors_total", handler="file") >= 250,
                "the master's /metrics to count the lost lines",
                timeout=30,
            )
            written = len(set(lost_ids) & access_ids(log))  # at most what the file's last page had room for
            assert written < 50, written
            output = stack.output()
            assert "Traceback" not in output and "Logging error" not in output
            reports = [json.loads(line) for line in output.splitlines() if '"event": "log_write_failed"' in line]
            print(f"full disk: {len(reports)} report lines on stderr for {300 - written} lost lines")
            assert 1 <= len(reports) <= 2 * (WORKERS + 1), reports  # once a minute per process at most
            assert all(report["handler"] == "file" and report["level"] == "ERROR" for report in reports)
            events = receiver.wait_for(lambda event: event.get("extra", {}).get("event") == "log_write_failed")
            assert len(events) <= 2 * (WORKERS + 1)

            filler.unlink()  # space again: logging resumes by itself
            freed_at = time.monotonic()
            ids = send(stack, "after-full", 20)
            wait_for(lambda: set(ids) <= access_ids(log), "new access lines once space is back", timeout=30)
            print(f"full disk: lines written again {time.monotonic() - freed_at:.2f} s after the space came back")
            text = log.read_text(encoding="utf-8")
            assert text.endswith("\n")
            for line in text.splitlines():
                json.loads(line)  # no torn line: every line is whole JSON
            assert stack.output().count('"event": "log_write_failed"') == len(reports)  # none once writing works
