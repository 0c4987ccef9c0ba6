"""deploy/postgres: create_db.sql on the session's real Postgres (role attributes, SCRAM
password, who may connect where, idempotence); the pg_hba/postgresql.conf snippets parsed by a
throwaway Postgres (pg_hba_file_rules, pg_file_settings); exporter_role.sql with the real
Postgres exporter connected as its role."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import shutil
import subprocess
import uuid

import psycopg2
import pytest

from service import devdb
from tests.deploy_files import DB_PASSWORD, DEPLOY, create_db, role_uri
from tests.deploy_tools import short_tmpdir


def query(handle, sql: str, *params, database: str = "postgres") -> list[tuple]:
    with psycopg2.connect(handle.get_uri(database)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    conn.close()
    return rows


def scram_matches(verifier: str, password: str) -> bool:
    """PostgreSQL's SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey, checked from scratch."""
    method, params, keys = verifier.split("$")
    iterations, salt = params.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return method == "SCRAM-SHA-256" and hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


def test_create_db_makes_an_unprivileged_login_role_owning_its_database(postgres, app_database):
    name, _ = app_database
    [role] = query(
        postgres,
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
        "rolbypassrls, rolinherit FROM pg_roles WHERE rolname = 'flaskapi'",
    )
    assert role == (True, False, False, False, False, False, True)
    [(owner, encoding)] = query(
        postgres,
        "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding) FROM pg_database WHERE datname = %s",
        name,
    )
    assert (owner, encoding) == ("flaskapi", "UTF8")
    [(verifier,)] = query(postgres, "SELECT rolpassword FROM pg_authid WHERE rolname = 'flaskapi'")
    assert scram_matches(verifier, DB_PASSWORD)


def test_the_role_connects_to_its_database_only(postgres, app_database):
    name, uri = app_database
    with psycopg2.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user, current_database()")
        assert cur.fetchone() == ("flaskapi", name)
        cur.execute("CREATE TABLE deploy_probe (id int); DROP TABLE deploy_probe")  # what migrations do
    conn.close()
    for other in ("postgres", "template1"):
        with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
            psycopg2.connect(role_uri(postgres, other)).close()
    postgres.psql("DROP ROLE IF EXISTS deploy_intruder; CREATE ROLE deploy_intruder LOGIN;")
    try:
        intruder = postgres.get_uri(name).replace("postgresql://postgres:", "postgresql://deploy_intruder:", 1)
        with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
            psycopg2.connect(intruder).close()
    finally:
        postgres.psql("DROP ROLE deploy_intruder;")
    assert query(postgres, "SELECT has_database_privilege('flaskapi', %s, 'CREATE')", name) == [(True,)]


def test_create_db_is_idempotent_and_reads_the_password_from_the_environment(postgres, app_database, monkeypatch):
    name, _ = app_database
    other_password = "another-password-9876543210"
    monkeypatch.setenv("FLASKAPI_DB_PASSWORD", other_password)
    create_db(postgres, name, None)  # the documented way: FLASKAPI_DB_PASSWORD, psql -f
    [(verifier,)] = query(postgres, "SELECT rolpassword FROM pg_authid WHERE rolname = 'flaskapi'")
    assert scram_matches(verifier, other_password)
    monkeypatch.delenv("FLASKAPI_DB_PASSWORD")
    create_db(postgres, name, DB_PASSWORD)
    [(verifier,)] = query(postgres, "SELECT rolpassword FROM pg_authid WHERE rolname = 'flaskapi'")
    assert scram_matches(verifier, DB_PASSWORD)
    assert query(postgres, "SELECT count(*) FROM pg_database WHERE datname = %s", name) == [(1,)]


@pytest.mark.parametrize("password", [None, "short"])
def test_create_db_refuses_a_missing_or_short_password(postgres, monkeypatch, password):
    monkeypatch.delenv("FLASKAPI_DB_PASSWORD", raising=False)
    name = f"deploy_refused_{uuid.uuid4().hex[:8]}"
    with pytest.raises(subprocess.CalledProcessError):
        create_db(postgres, name, password)
    assert query(postgres, "SELECT count(*) FROM pg_database WHERE datname = %s", name) == [(0,)]


def test_postgres_snippets_parse_in_a_real_postgres():
    hba = [
        line.split()
        for line in (DEPLOY / "postgres" / "pg_hba.conf.snippet").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert hba == [["hostssl", "flaskapi", "flaskapi", "10.0.0.10/32", "scram-sha-256"]]
    conf = (DEPLOY / "postgres" / "postgresql.conf.snippet").read_text()
    settings = dict(re.findall(r"^(\w+)\s*=\s*'?([^'#\n]*?)'?\s*(?:#.*)?$", conf, flags=re.M))
    assert settings["listen_addresses"] == "localhost,10.0.0.20"
    assert settings["ssl"] == "on" and settings["password_encryption"] == "scram-sha-256"

    pgdata = short_tmpdir("fapg-snip-")
    pgdata.chmod(0o755)
    handle = devdb.server(pgdata, cleanup_mode="delete")
    try:
        first_hba_line = len((pgdata / "pg_hba.conf").read_text().splitlines()) + 1
        first_conf_line = len((pgdata / "postgresql.conf").read_text().splitlines()) + 1
        with open(pgdata / "pg_hba.conf", "a") as f:
            f.write("\n" + (DEPLOY / "postgres" / "pg_hba.conf.snippet").read_text())
        with open(pgdata / "postgresql.conf", "a") as f:
            f.write("\n# deploy/postgres/postgresql.conf.snippet\n" + conf)
        # Both views parse the files as they are on disk now (no reload needed).
        rules = query(
            handle,
            "SELECT line_number, type, database, user_name, address, netmask, auth_method, "
            "error FROM pg_hba_file_rules WHERE line_number >= %s",
            first_hba_line,
        )
        assert len(rules) == 1, rules
        *rule, error = rules[0]
        assert rule[1:] == ["hostssl", ["flaskapi"], ["flaskapi"], "10.0.0.10", "255.255.255.255", "scram-sha-256"]
        # hostssl needs ssl = on; this Postgres (pgserver's build) has no SSL at all.
        assert error is None or "SSL" in error, error
        rows = query(
            handle,
            "SELECT name, error FROM pg_file_settings WHERE sourcefile = %s AND sourceline >= %s",
            str(pgdata / "postgresql.conf"),
            first_conf_line,
        )
        assert {name for name, _ in rows} == set(settings)
        # listen_addresses takes a restart (and another address); ssl = on needs an SSL build.
        errors = {name: error for name, error in rows if error and name not in ("listen_addresses", "ssl")}
        assert errors == {}
    finally:
        handle.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


EXPORTER_ROLE = DEPLOY / "postgres" / "exporter_role.sql"


def test_exporter_role_reads_every_session_and_nothing_else(postgres, app_database, tmp_path):
    """exporter_role.sql twice (idempotent) after create_db.sql: the real Postgres exporter,
    connected as that role to `postgres`, reaches the server and counts the app role's sessions
    in the app's database; the role itself may not connect there, nor write."""
    from bench.harness import exporters
    from bench.harness.environment import free_port
    from bench.harness.scrape import metric, scrape

    name, uri = app_database
    for _ in range(2):
        assert "role prometheus is ready" in postgres.psql(EXPORTER_ROLE.read_text())
    [(login, superuser, limit)] = query(
        postgres, "SELECT rolcanlogin, rolsuper, rolconnlimit FROM pg_roles WHERE rolname = 'prometheus'"
    )
    assert login and not superuser and limit == 3
    assert query(postgres, "SELECT pg_has_role('prometheus', 'pg_monitor', 'MEMBER')") == [(True,)]
    assert query(postgres, "SELECT has_database_privilege('prometheus', %s, 'CONNECT')", name) == [(False,)]
    exporter_uri = postgres.get_uri("postgres").replace("postgresql://postgres:", "postgresql://prometheus:", 1)
    with (
        psycopg2.connect(exporter_uri) as conn,
        conn.cursor() as cur,
        pytest.raises(psycopg2.errors.InsufficientPrivilege),
    ):
        cur.execute("CREATE TABLE exporter_was_here (id int)")
    conn.close()

    app = psycopg2.connect(uri)  # one session of the app's role, idle in its database
    port = free_port()
    try:
        with exporters.postgres_exporter(exporters.libpq_dsn(exporter_uri), port, tmp_path / "exporter.out"):
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        app.close()
    assert metric(samples, "pg_up") == 1, (tmp_path / "exporter.out").read_text()[-2000:]
    assert metric(samples, "pg_stat_activity_count", datname=name, state="idle") == 1
