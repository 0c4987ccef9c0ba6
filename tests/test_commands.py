"""`flask db-custom seed|drop`, and the Alembic migrations on real databases."""

from __future__ import annotations

import json
import shlex
import time

import psycopg2.extensions
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import event, inspect, text

from service import create_app, devdb
from service.commands import CHUNK
from service.extensions import db
from tests.conftest import TEST_SECRET, empty_tables

APP_TABLES = {"users", "books", "throttle_counters", "alembic_version"}
HEAD = "0003"  # the newest migration (migrations/versions/)


def scalar(app, sql: str):
    with app.app_context(), db.engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


def counts(app) -> tuple[int, int]:
    return scalar(app, "SELECT count(*) FROM users"), scalar(app, "SELECT count(*) FROM books")


def tables(app) -> set[str]:
    with app.app_context():
        return set(inspect(db.engine).get_table_names())


def version(app) -> str | None:
    return scalar(app, "SELECT version_num FROM alembic_version")


# --- seed ----------------------------------------------------------------------------------


def test_seed_adds_exactly_the_requested_rows(app, client, runner):
    client.post("/auth/register", json={"email": "existing@example.com", "password": "secret"})
    before = counts(app)
    assert before == (1, 0)
    result = runner.invoke(args=["db-custom", "seed", "--users", "3", "--books", "120", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "Seeded 3 users" in result.output and "120 books" in result.output
    assert counts(app) == (4, 120)
    with app.app_context(), db.engine.connect() as conn:
        seeded = [r.id for r in conn.execute(text("SELECT id FROM users WHERE email <> 'existing@example.com'"))]
        owners = {r.owner_id for r in conn.execute(text("SELECT DISTINCT owner_id FROM books"))}
        lengths = conn.execute(
            text("SELECT min(length(title)), max(length(title)), count(*) FILTER (WHERE author IS NULL) FROM books")
        ).one()
    assert len(seeded) == 3
    assert owners <= set(seeded)  # every book belongs to a seeded user
    assert lengths[0] >= 1 and lengths[1] <= 200 and lengths[2] == 0
    # seeded users are real accounts: the login the command prints works as printed
    [printed] = [line for line in result.output.splitlines() if "/auth/login" in line]
    credentials = json.loads(shlex.split(printed)[-1])
    assert credentials["password"] == "seed-password"
    assert credentials["email"] in {scalar(app, f"SELECT email FROM users WHERE id = {int(i)}") for i in seeded}  # noqa: S608
    login = client.post("/auth/login", json=credentials)
    assert login.status_code == 200
    # and the seeded books are served by the API
    assert client.get("/books?limit=100").get_json()["next_cursor"] is not None


def test_seed_with_same_seed_is_repeatable(app, runner):
    args = ["db-custom", "seed", "--users", "2", "--books", "30", "--seed", "7"]

    def snapshot():
        with app.app_context(), db.engine.connect() as conn:
            users = [r.email for r in conn.execute(text("SELECT email FROM users ORDER BY id"))]
            books = [tuple(r) for r in conn.execute(text("SELECT title, author FROM books ORDER BY id"))]
        return users, books

    assert runner.invoke(args=args).exit_code == 0
    first = snapshot()
    empty_tables(app)
    assert runner.invoke(args=args).exit_code == 0
    assert snapshot() == first


def test_seed_twice_with_same_seed_is_a_clear_error(app, runner):
    args = ["db-custom", "seed", "--users", "2", "--books", "10", "--seed", "5"]
    assert runner.invoke(args=args).exit_code == 0
    result = runner.invoke(args=args)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a driver error
    assert "--seed 5 was already used" in result.output
    assert "Traceback" not in result.output
    assert counts(app) == (2, 10)  # the failed run wrote nothing
    # without --seed a second run gets fresh emails
    assert runner.invoke(args=["db-custom", "seed", "--users", "2", "--books", "10"]).exit_code == 0
    assert counts(app) == (4, 20)


def test_seed_zero_books(app, runner):
    result = runner.invoke(args=["db-custom", "seed", "--users", "1", "--books", "0"])
    assert result.exit_code == 0, result.output
    assert counts(app) == (1, 0)


@pytest.mark.parametrize("args", [["--users", "0"], ["--books", "-1"], ["--users", "abc"]])
def test_seed_rejects_bad_options(app, runner, args):
    result = runner.invoke(args=["db-custom", "seed", *args])
    assert result.exit_code == 2
    assert counts(app) == (0, 0)


def test_seed_100k_books_streams_them_with_a_few_copies(app, runner):
    """What makes the seed fast, checked instead of its duration (which is the machine's): the
    books go in with one COPY per chunk, not one INSERT each; the statements besides are few."""
    sent: list[str] = []

    class Recording(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):
            sent.append("execute")
            return super().execute(query, vars)

        def executemany(self, query, vars_list):
            sent.append("executemany")
            return super().executemany(query, vars_list)

        def copy_expert(self, sql, file, *args, **kwargs):
            sent.append(sql.split(" (")[0])  # "COPY books"
            return super().copy_expert(sql, file, *args, **kwargs)

    def record(dbapi_connection, connection_record, proxy):
        dbapi_connection.cursor_factory = Recording

    with app.app_context():
        engine = db.engine
    event.listen(engine, "checkout", record)
    try:
        started = time.perf_counter()
        result = runner.invoke(args=["db-custom", "seed", "--users", "10", "--books", "100000", "--seed", "3"])
        print(f"seeding 100,000 books took {time.perf_counter() - started:.1f}s")
    finally:
        event.remove(engine, "checkout", record)
        engine.dispose()  # no pooled connection keeps the recording cursor
    assert result.exit_code == 0, result.output
    assert counts(app) == (10, 100_000)
    assert [s for s in sent if s.startswith("COPY")] == ["COPY users"] + ["COPY books"] * -(-100_000 // CHUNK)
    assert "executemany" not in sent and sent.count("execute") <= 5, sent


# --- drop ----------------------------------------------------------------------------------


def test_drop_then_upgrade_recreates_the_schema(app, client, runner):
    client.post("/auth/register", json={"email": "dropped@example.com", "password": "secret"})
    assert tables(app) >= APP_TABLES
    try:
        result = runner.invoke(args=["db-custom", "drop"])
        assert result.exit_code == 0, result.output
        assert "Dropped all tables" in result.output
        assert tables(app) & APP_TABLES == set()

        result = runner.invoke(args=["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert tables(app) >= APP_TABLES
        assert version(app) == HEAD
        assert counts(app) == (0, 0)  # the data went with the tables
        response = client.post("/auth/register", json={"email": "again@example.com", "password": "secret"})
        assert response.status_code == 201
    finally:
        with app.app_context():
            upgrade()  # leave the schema migrated for every other test


def test_drop_refuses_in_production_without_yes(database_uri, tmp_path, app):
    prod = create_app(
        {
            "FLASK_ENV": "production",
            "DB_URI": database_uri,
            "JWT_SECRET_KEY": TEST_SECRET,
            "DATA_DIR": str(tmp_path),
            "LOG_TO_FILE": "0",
        }
    )
    try:
        result = prod.test_cli_runner().invoke(args=["db-custom", "drop"])
        assert result.exit_code == 2
        assert "--yes" in result.output
        assert tables(app) >= APP_TABLES
    finally:
        with prod.app_context():
            db.engine.dispose()
        with app.app_context():
            upgrade()


# --- migrations ----------------------------------------------------------------------------


@pytest.fixture
def empty_database(postgres):
    name = "test_migrations_empty"
    postgres.psql(f'DROP DATABASE IF EXISTS "{name}";')
    return devdb.create_database(postgres, name)


def test_migrations_on_an_empty_database(make_app, empty_database):
    app = make_app(DB_URI=empty_database)
    assert tables(app) == set()
    try:
        with app.app_context():
            upgrade()
        assert tables(app) >= APP_TABLES
        assert version(app) == HEAD

        # the migrated schema is exactly what the models describe
        with app.app_context(), db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), db.metadata) == []

        # a second upgrade is a no-op
        with app.app_context():
            upgrade()
        assert version(app) == HEAD
        assert tables(app) >= APP_TABLES

        # down to nothing, and back up
        with app.app_context():
            downgrade(revision="base")
        assert tables(app) & {"users", "books"} == set()
        assert scalar(app, "SELECT count(*) FROM alembic_version") == 0
        with app.app_context():
            upgrade()
        assert version(app) == HEAD

        # the re-created schema works end to end
        client = app.test_client()
        credentials = {"email": "fresh@example.com", "password": "secret"}
        assert client.post("/auth/register", json=credentials).status_code == 201
        token = client.post("/auth/login", json=credentials).get_json()["token"]
        response = client.post("/books", json={"title": "Fresh"}, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 201
    finally:
        with app.app_context():
            upgrade()  # make_app's teardown empties the tables, so they must exist


def test_test_database_is_at_head(app):
    assert version(app) == HEAD
    with app.app_context(), db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), db.metadata) == []
