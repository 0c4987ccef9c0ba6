"""Fixtures: one real Postgres per test session, an app per test, tables emptied after each."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from service import create_app, devdb
from service.extensions import db
from tests.deploy_files import DB_PASSWORD, create_db, role_uri

# Low hashing cost keeps the suite fast; the production cost is exercised by the stack tests.
FAST_HASHING = {"PASSWORD_HASH_TIME_COST": "1", "PASSWORD_HASH_MEMORY_KIB": "1024"}
# Fixed, so every module (and every stack a test starts) signs with the same key; 64 random-looking
# hex characters, so it passes production's guard (length and entropy) and HS512's key length.
TEST_SECRET = hashlib.sha256(b"flaskapi-observability test key").hexdigest()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 16 (pgserver) in a short temp path (Unix socket paths are limited)."""
    pgdata = Path(tempfile.mkdtemp(prefix="fapg-", dir="/tmp"))
    pgdata.chmod(0o755)
    handle = devdb.server(pgdata, cleanup_mode="stop")
    yield handle
    handle.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_database(postgres, tmp_path_factory):
    """Factory: a new database on the session server, migrated to head; returns its URI."""

    def _create(name: str) -> str:
        uri = devdb.create_database(postgres, name)
        app = create_app(base_config(uri, tmp_path_factory.mktemp("data")))
        with app.app_context():
            from flask_migrate import upgrade

            upgrade()
            db.engine.dispose()
        return uri

    return _create


@pytest.fixture(scope="session")
def database_uri(migrated_database):
    """The migrated database of the in-process tests."""
    return migrated_database("test_api")


@pytest.fixture(scope="module")
def app_database(postgres):
    """A fresh database made by deploy/postgres/create_db.sql on the session's Postgres, as the
    deploy tests use it: (name, URI of the role it makes)."""
    name = f"deploy_{uuid.uuid4().hex[:8]}"
    output = create_db(postgres, name, DB_PASSWORD)
    assert f'database "{name}" are ready' in output
    return name, role_uri(postgres, name)


def base_config(uri: str, data_dir: Path, **extra) -> dict:
    return {
        "FLASK_ENV": "testing",
        "DB_URI": uri,
        "JWT_SECRET_KEY": TEST_SECRET,
        "DATA_DIR": str(data_dir),
        **FAST_HASHING,
        **extra,
    }


@pytest.fixture
def make_app(database_uri, tmp_path):
    """Build an app with extra settings; every table is emptied after the test."""
    apps = []

    def _make(**extra):
        app = create_app(base_config(database_uri, tmp_path, **extra))
        apps.append(app)
        return app

    yield _make
    for app in apps:
        empty_tables(app)


def empty_tables(app) -> None:
    """After a test: every row gone (the throttle's counters too), the app's pool closed."""
    with app.app_context():
        with db.engine.begin() as conn:
            conn.execute(text("TRUNCATE users, books, throttle_counters RESTART IDENTITY CASCADE"))
        db.engine.dispose()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def login(client):
    """Register + log in a user; returns the Authorization headers."""

    def _login(email: str = "reader@example.com", password: str = "secret") -> dict:
        client.post("/auth/register", json={"email": email, "password": password})
        response = client.post("/auth/login", json={"email": email, "password": password})
        assert response.status_code == 200, response.get_json()
        return {"Authorization": f"Bearer {response.get_json()['token']}"}

    return _login


def eventually(read, expected, *, timeout: float = 30.0, interval: float = 0.1):
    """`read()` until it returns `expected` (sampled gauges are up to a second old, more on a
    loaded machine); the last value read otherwise, for the caller's assertion to show."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(interval)
