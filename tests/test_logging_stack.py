"""Logs from a real gunicorn with several workers: one JSON stream, rotated, nothing lost."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn

pytestmark = pytest.mark.stack

REQUIRED = {"timestamp", "level", "logger", "message", "pid"}
ACCESS_KEYS = {"request_id", "method", "path", "route", "status", "duration_ms", "user_id", "remote_addr"}


def read_lines(log_dir: Path) -> list[tuple[str, str]]:
    """(file name, raw line) for every line of every log file, rotated ones included."""
    lines = []
    for path in sorted(log_dir.glob("app.log*")):
        text = path.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n"), f"{path.name} ends in a torn line"
        lines += [(path.name, line) for line in text.splitlines()]
    return lines


@pytest.fixture(scope="module")
def rotation_run(migrated_database, tmp_path_factory):
    """Drive a bounded concurrent load while the log rotates every second."""
    data_dir = tmp_path_factory.mktemp("logrun")
    env = stack_env(
        migrated_database("test_logging"),
        data_dir,
        LOG_ROTATE_WHEN="S",
        LOG_ROTATE_INTERVAL="1",
        LOG_BACKUP_COUNT="0",
        LOG_CONSOLE="0",
    )
    sent: list[str] = []
    completed: list[str] = []
    lock = threading.Lock()
    with Gunicorn(env, workers=3, log_path=data_dir / "gunicorn.out") as stack:
        paths = ["/healthz", "/books/", "/books/?limit=5", "/books/999999", "/nope"]

        def one(i: int) -> None:
            request_id = f"rot-{i}-{uuid.uuid4().hex[:8]}"
            with lock:
                sent.append(request_id)
            response = requests.get(stack.url + paths[i % len(paths)], headers={"X-Request-ID": request_id}, timeout=10)
            assert response.headers["X-Request-ID"] == request_id
            with lock:
                completed.append(request_id)

        started = time.monotonic()
        count = 0
        with ThreadPoolExecutor(max_workers=8) as pool:
            # At least 3,000 requests and at least 3.5 s (three rotations); bounded at 240 s.
            while (count < 3000 or time.monotonic() - started < 3.5) and time.monotonic() - started < 240:
                list(pool.map(one, range(count, count + 200)))
                count += 200
        stack.stop()
    return data_dir / "logs", sent, completed


def test_every_line_is_json_with_the_required_keys(rotation_run):
    log_dir, _, _ = rotation_run
    lines = read_lines(log_dir)
    assert len(lines) > 3000
    for name, raw in lines:
        data = json.loads(raw)  # raises on a torn or interleaved line
        assert data.keys() >= REQUIRED, (name, raw)


def test_no_access_line_is_lost_or_duplicated_across_rotations(rotation_run):
    log_dir, sent, completed = rotation_run
    files = sorted(p.name for p in log_dir.glob("app.log*"))
    assert len(files) >= 3, f"expected at least two rotations, saw files {files}"
    access = [json.loads(raw) for _, raw in read_lines(log_dir)]
    access = [a for a in access if a.get("event") == "access"]
    ids = [a["request_id"] for a in access if a["request_id"].startswith("rot-")]  # not the readiness probe
    assert len(completed) == len(sent) >= 3000
    assert len(ids) == len(set(ids)), "an access line was written twice"
    assert sorted(ids) == sorted(completed), "access lines differ from completed requests"
    print(f"rotation run: {len(completed)} requests, {len(ids)} access lines, {len(files)} files")
    for line in access:
        assert line.keys() >= ACCESS_KEYS
    assert len({a["pid"] for a in access}) == 3, "all three workers should have served and logged"


def test_master_and_workers_share_the_stream(rotation_run):
    log_dir, _, _ = rotation_run
    data = [json.loads(raw) for _, raw in read_lines(log_dir)]
    loggers = {d["logger"] for d in data}
    assert "gunicorn.error" in loggers  # master: boot, worker spawn, shutdown
    assert "service.access" in loggers  # workers
    assert any("Shutting down" in d["message"] for d in data if d["logger"] == "gunicorn.error")


def test_no_password_or_token_reaches_the_logs(migrated_database, tmp_path):
    env = stack_env(migrated_database("test_logging_secrets"), tmp_path)
    passwords = [f"pw-{uuid.uuid4().hex}" for _ in range(4)]
    tokens = []
    with Gunicorn(env, workers=3, log_path=tmp_path / "gunicorn.out") as stack:
        for i, password in enumerate(passwords):
            creds = {"email": f"secret{i}@example.com", "password": password}
            assert requests.post(stack.url + "/auth/register", json=creds, timeout=10).status_code == 201
            token = requests.post(stack.url + "/auth/login", json=creds, timeout=10).json()["token"]
            tokens.append(token)
            auth = {"Authorization": f"Bearer {token}"}
            assert (
                requests.post(stack.url + "/books/", json={"title": "t"}, headers=auth, timeout=10).status_code == 201
            )
            # failures log too: a wrong password, a malformed body quoting the password, a bad token
            requests.post(stack.url + "/auth/login", json={**creds, "password": password + "x"}, timeout=10)
            requests.post(
                stack.url + "/auth/login",
                data=f'{{"password": "{password}"',
                timeout=10,
                headers={"Content-Type": "application/json"},
            )
            requests.get(stack.url + "/books/", headers={"Authorization": f"Bearer {token}x"}, timeout=10)
        stack.stop()
        everything = stack.output() + "".join(p.read_text() for p in (tmp_path / "logs").glob("app.log*"))
    assert everything.count('"event": "access"') >= 4 * 6
    for secret in passwords + tokens:
        assert secret not in everything
    assert "Bearer " not in everything
