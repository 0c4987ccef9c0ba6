"""The real stack end to end: a database migrated by the real CLI, gunicorn with the real config
(production mode, the default OWASP hashing cost, three workers), the lesson's locustfile
unmodified against it, and the production guard that refuses to start a weak configuration.

Every process is started here and stopped here, by PID (process group), with timeouts.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from bench.harness.commands import run_command
from bench.harness.environment import free_port, locust_command, locust_env
from bench.harness.gunicorn import CONFIG, GUNICORN, Gunicorn
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from service import devdb
from tests.conftest import TEST_SECRET

pytestmark = pytest.mark.stack

SECRET = TEST_SECRET  # passes the production guard (length and entropy)
# Empty means "use the default" to Settings, so an ambient value cannot lower the cost or turn
# the crash route on; nothing here is left to whatever the caller's shell exports.
DEFAULTS = {
    "PASSWORD_HASH_TIME_COST": "",
    "PASSWORD_HASH_MEMORY_KIB": "",
    "PASSWORD_HASH_PARALLELISM": "",
    "CRASH_ROUTE_ENABLED": "",
}
LOCUST_USERS = 30


run = run_command


def server_errors(output: str) -> list[str]:
    """The JSON log lines (gunicorn's captured stderr) that record a 5xx answer."""
    found = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        status = record.get("status") if isinstance(record, dict) else None
        if isinstance(status, int) and status >= 500:
            found.append(line)
    return found


def base_env(**values: str) -> dict[str, str]:
    """The caller's environment without what would change which app runs or where it writes."""
    dropped = ("FLASK_APP", "FLASK_DEBUG", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(DEFAULTS)
    env.update(values)
    return env


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="module")
def stack_db(postgres, stack_dir) -> str:
    """A fresh database, migrated by `python -m flask db upgrade` as an operator runs it."""
    uri = devdb.create_database(postgres, "test_stack")
    env = base_env(
        DB_URI=uri,
        FLASK_ENV="production",
        JWT_SECRET_KEY=SECRET,
        DATA_DIR=str(stack_dir),
        LOG_DIR=str(stack_dir / "logs"),
    )
    result = run([sys.executable, "-m", "flask", "db", "upgrade"], env, timeout=120)
    assert result.returncode == 0, result.stdout
    engine = create_engine(uri)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    finally:
        engine.dispose()
    return uri


@pytest.fixture(scope="module")
def stack(stack_db, stack_dir):
    env = {
        "FLASK_ENV": "production",
        "DB_URI": stack_db,
        "JWT_SECRET_KEY": SECRET,
        "DATA_DIR": str(stack_dir),
        "LOG_DIR": str(stack_dir / "logs"),
        **DEFAULTS,
    }
    with Gunicorn(env, workers=3, log_path=stack_dir / "gunicorn.out") as server:
        yield server


def locust_stats(path: Path) -> dict[tuple[str, str], dict]:
    """Locust's --csv stats as last written, by (method, name); {} before the first write."""
    try:
        with open(path, newline="") as handle:
            return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}
    except (FileNotFoundError, KeyError):  # not written yet, or its header caught mid-write
        return {}


def enough_load(by_name: dict) -> bool:
    """The work the assertions below need: every user registered and logged in, more than 100
    requests, at least one list and one create, and some PUTs and DELETEs (rewritten every
    second, a row may be caught mid-write). Tasks are drawn at random: a run of 103 requests
    once held no GET /books/ at all, so each kind asserted below is waited for, not assumed."""

    def count(key) -> int:
        try:
            return int(by_name[key]["Request Count"])
        except (KeyError, TypeError, ValueError):
            return 0

    return (
        count(("POST", "/auth/register")) >= LOCUST_USERS
        and count(("POST", "/auth/login")) >= LOCUST_USERS
        and count(("", "Aggregated")) > 100
        and count(("GET", "/books/")) >= 1
        and count(("POST", "/books/")) >= 1
        and all(any(kind == method for kind, _ in by_name) for method in ("PUT", "DELETE"))
    )


def test_locust_lesson_load_has_no_failures(stack, stack_db, stack_dir):
    prefix = stack_dir / "run"
    stats = Path(f"{prefix}_stats.csv")
    args = locust_command(stack.url, users=LOCUST_USERS, rate=10, extra=("--csv", str(prefix)))
    # Its exporter on a free port, not the locustfile's default one.
    env = locust_env(LOCUST_METRICS_BIND=f"127.0.0.1:{free_port()}")
    # No -t: the run lasts until the work checked below is done (longer on a slower machine),
    # then locust is stopped as an operator does, with SIGTERM (it stops its users, then writes
    # its summary and stats).
    locust = ManagedProcess(args, env=env, log_path=stack_dir / "locust.out", name="locust").start()
    try:

        def progressed() -> bool:
            assert locust.poll() is None, f"locust exited {locust.poll()}"
            return enough_load(locust_stats(stats))

        try:
            wait_for(
                progressed,
                f"{LOCUST_USERS} users logged in, 100+ requests, PUTs and DELETEs",
                timeout=180,
                interval=0.5,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{locust.output()[-5000:]}") from None
    finally:
        code = locust.stop(30)
    output = locust.output()
    assert code == 0, output[-5000:]

    by_name = locust_stats(stats)
    total = by_name[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, output[-5000:]
    assert int(total["Request Count"]) > 100, total
    for key in [("POST", "/auth/register"), ("POST", "/auth/login"), ("GET", "/books/"), ("POST", "/books/")]:
        assert key in by_name, sorted(by_name)
        assert int(by_name[key]["Request Count"]) > 0 and int(by_name[key]["Failure Count"]) == 0
    # Every simulated user registered and logged in exactly once (no retry loop).
    assert int(by_name[("POST", "/auth/register")]["Request Count"]) == LOCUST_USERS
    assert int(by_name[("POST", "/auth/login")]["Request Count"]) == LOCUST_USERS
    # PUT/DELETE rows are named per book id: present, and all succeeded.
    for method in ("PUT", "DELETE"):
        named = [row for (kind, _), row in by_name.items() if kind == method]
        assert named and all(r["Name"].startswith("/books/") for r in named), sorted(by_name)

    engine = create_engine(stack_db)
    try:
        with engine.connect() as conn:
            users = conn.execute(text("SELECT count(*) FROM users WHERE email LIKE 'test%@test.com'"))
            assert users.scalar() == LOCUST_USERS
            # The stored hashes use the default OWASP cost, not a test shortcut.
            hashes = {row[0] for row in conn.execute(text("SELECT password_hash FROM users"))}
    finally:
        engine.dispose()
    assert hashes and all(h.startswith("$argon2id$v=19$m=19456,t=2,p=1$") for h in hashes), hashes

    # The stack is still healthy after the load, and no request was answered with a 5xx.
    assert requests.get(stack.url + "/readyz", timeout=5).status_code == 200
    assert server_errors(stack.output()) == []


def test_lists_but_no_docs_nor_crash_route_in_production(stack):
    for path in ("/books", "/books/"):
        response = requests.get(stack.url + path, timeout=10, allow_redirects=False)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        assert response.headers["Content-Type"].startswith("application/json")
        body = response.json()
        assert isinstance(body["items"], list) and "next_cursor" in body

    # Production: no map of the API for anyone who asks (DOCS_ENABLED turns it on), and no crash route.
    for path in ("/openapi.json", "/docs", "/docs/assets/swagger-ui-bundle.js", "/auth/crash"):
        response = requests.get(stack.url + path, timeout=10)
        assert response.status_code == 404, path
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json()["error"]["status"] == 404 and response.json()["error"]["code"] == "not_found"
    assert "docs" not in requests.get(stack.url + "/", timeout=10).json()
    # The worker that answered is still there: nothing crashed.
    assert requests.get(stack.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "setting, values",
    [
        ("JWT_SECRET_KEY", {"JWT_SECRET_KEY": "x" * 31}),  # one byte short of the minimum
        ("DB_URI", {"JWT_SECRET_KEY": SECRET, "DB_URI": "", "DATABASE_URL": ""}),
    ],
    ids=["short-jwt-secret", "missing-db-uri"],
)
def test_production_guard_refuses_to_start(setting, values, stack_db, tmp_path):
    port = free_port()
    metrics_dir = tmp_path / "metrics"  # empty, as a launcher must provide (see bench.harness.gunicorn)
    metrics_dir.mkdir()
    env = base_env(
        FLASK_ENV="production",
        DB_URI=stack_db,
        BIND=f"127.0.0.1:{port}",
        METRICS_BIND=f"127.0.0.1:{free_port()}",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        WEB_CONCURRENCY="1",
        DATA_DIR=str(tmp_path),
        LOG_DIR=str(tmp_path / "logs"),
    )
    env.update(values)
    result = run([str(GUNICORN), "-c", str(CONFIG)], env, timeout=60)
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if setting in line]
    assert lines, f"no line names {setting}:\n{result.stdout[-3000:]}"
    assert "configuration error" in lines[0], lines
    # It never served: nothing answers on its port.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
