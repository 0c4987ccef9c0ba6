"""The deployment files, checked with the real tools and run where they can run here.

- systemd: `systemd-analyze verify` on every unit and the Prometheus drop-in (any warning line
  fails), then the units' own commands executed in order, as systemd would with their
  Environment=/EnvironmentFile=: migrations as the database role create_db.sql makes, gunicorn
  telling READY=1 on a NOTIFY_SOCKET, a reload (HUP) that keeps the master, a graceful stop
  within TimeoutStopSec.
- Postgres: create_db.sql on the session's real Postgres (role attributes, SCRAM password, who
  may connect where, idempotence); the pg_hba/postgresql.conf snippets parsed by a throwaway
  Postgres (pg_hba_file_rules, pg_file_settings).
- nginx: `nginx -t` on the site, then a real nginx in front of a header-echoing upstream.
- install.sh: shellcheck, and real runs with --root and --dry-run.
- compose: `docker-compose config -q`, the host paths it mounts, its published ports, its
  Prometheus and Grafana files against monitoring/ (promtool), and the image's CMD and
  HEALTHCHECK run against a real gunicorn.

Needs systemd-analyze (systemd), nginx, shellcheck, docker-compose and prometheus/promtool
(`apt-get install --no-install-recommends systemd nginx shellcheck docker-compose prometheus`);
a missing tool fails the test with that hint rather than skipping it.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg2
import pytest
import requests
import yaml
from dotenv import dotenv_values

from bench.harness.environment import ROOT, free_port
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from bench.harness.scrape import metric, scrape
from service import devdb
from service.settings import Settings

DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNITS = ["flaskapi.service", "flaskapi-migrate.service"]
ENV_EXAMPLE = DEPLOY / "env.example"
CREATE_DB = DEPLOY / "postgres" / "create_db.sql"
NGINX_SITE = DEPLOY / "nginx" / "flaskapi.conf"
INSTALL = DEPLOY / "install.sh"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
SECRET = "d" * 48
DB_PASSWORD = "deploy-test-password-0123456789"

APT = {"systemd-analyze": "systemd", "nginx": "nginx", "shellcheck": "shellcheck",
       "docker-compose": "docker-compose", "promtool": "prometheus", "prometheus": "prometheus"}


def tool(name: str) -> str:
    path = shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin")
                                       if (p := Path(d) / name).exists()), None)
    if path is None:
        pytest.fail(f"`{name}` not found: install it with `apt-get install --no-install-recommends "
                    f"{APT[name]}` (Debian/Ubuntu). The CI script must install it.", pytrace=False)
    return path


def run(args: list[str], *, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, f"{shlex.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def short_tmpdir(prefix: str) -> Path:
    """Unix socket paths are limited to ~108 bytes: pytest's tmp_path can be too long."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- parsing helpers ---------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's format: sections, repeatable keys (order kept), `#`/`;` comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {raw!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


def unit_environment(unit: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in unit["Service"].get("Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


def env_example_names() -> list[str]:
    """Names set (`NAME=`) or documented with their default (`#NAME=`) in env.example."""
    return re.findall(r"^#?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M)


def env_example_values() -> dict[str, str]:
    return {k: v for k, v in dotenv_values(ENV_EXAMPLE).items() if v is not None}


def readme_settings() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    assert len(names) > 30, names
    return names


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """{stage: [(INSTRUCTION, arguments)]} with line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), flags=re.I)
            current = stages.setdefault(match.group(2) or match.group(1), [])
            if match.group(1) in stages:  # FROM <earlier stage>: inherits its instructions
                current.extend(stages[match.group(1)])
            current.append(("FROM", match.group(1)))
            continue
        current.append((instruction, args.strip()))
    return stages


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for instruction, args in instructions:
        if instruction == "ENV":
            for assignment in shlex.split(args):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def last(instructions: list[tuple[str, str]], name: str) -> str:
    found = [args for instruction, args in instructions if instruction == name]
    assert found, f"no {name} in the stage"
    return found[-1]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_binary() -> list[str]:
    """Compose v2 (`docker compose`) when the plugin is there, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [tool("docker-compose")]


# --- processes ---------------------------------------------------------------------------------

def child_pids(master_pid: int) -> set[int]:
    """The master's children as the operating system sees them (not as its metrics report them)."""
    return {child.pid for child in psutil.Process(master_pid).children()}


def wait_workers(master: int, count: int, timeout: float = 60) -> set[int]:
    def workers():
        pids = child_pids(master)
        return pids if len(pids) == count else None

    return wait_for(workers, f"{count} workers under the master {master}", timeout)


def scraped(url: str, name: str) -> float:
    return metric(scrape(url), name)


# =================================================================================================
# systemd

def rewritten_unit(text: str, tmp: Path | None = None) -> str:
    """A unit whose paths exist here: the repo's venv and checkout instead of /opt/flaskapi, and
    (to run its commands) the run/log/state directories under tmp."""
    text = text.replace("/opt/flaskapi/venv/bin/", f"{VENV_BIN}/").replace("/opt/flaskapi/app", str(ROOT))
    if tmp is not None:
        for name in ("/run/flaskapi", "/var/log/flaskapi", "/var/lib/flaskapi"):
            text = text.replace(name, str(tmp / name.strip("/")))
    return text


def verify(paths: list[Path]) -> str:
    result = run([tool("systemd-analyze"), "verify", "--man=no", *paths], check=False)
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f"\n(exit {result.returncode})")


def test_units_verify_without_a_single_warning(tmp_path):
    for name in UNITS:
        (tmp_path / name).write_text(rewritten_unit((SYSTEMD / name).read_text()))
    output = verify([tmp_path / name for name in UNITS])
    assert output == "", f"systemd-analyze verify:\n{output}"

    # The check would see a problem: an unknown key is only a warning, with exit status 0.
    (tmp_path / "flaskapi.service").write_text((tmp_path / "flaskapi.service").read_text()
                                               .replace("[Service]\n", "[Service]\nNoSuchKey=1\n"))
    assert "NoSuchKey" in verify([tmp_path / "flaskapi.service"])


def test_prometheus_drop_in_verifies_on_the_distribution_unit(tmp_path):
    base = next((p for p in (Path("/lib/systemd/system/prometheus.service"),
                             Path("/usr/lib/systemd/system/prometheus.service")) if p.exists()), None)
    if base is None:
        tool("prometheus")
        pytest.fail("prometheus is installed but not its systemd unit: install Debian's `prometheus` "
                    "package", pytrace=False)
    drop_in = SYSTEMD / "prometheus.service.d" / "flaskapi.conf"
    shutil.copy(base, tmp_path / "prometheus.service")
    (tmp_path / "prometheus.service.d").mkdir()
    shutil.copy(drop_in, tmp_path / "prometheus.service.d" / "flaskapi.conf")
    output = verify([tmp_path / "prometheus.service"])
    assert output == "", f"systemd-analyze verify:\n{output}"

    # The drop-in is read (a bad key in it is reported), so the clean result above covers it.
    (tmp_path / "prometheus.service.d" / "flaskapi.conf").write_text(drop_in.read_text() + "NoSuchKey=1\n")
    assert "flaskapi.conf" in verify([tmp_path / "prometheus.service"])

    exec_start = parse_unit(drop_in)["Service"]["ExecStart"]
    assert exec_start[0] == "", "ExecStart= must be reset before it is replaced"
    args = shlex.split(exec_start[1])
    assert "--config.file=/etc/prometheus/flaskapi/prometheus.yml" in args
    assert "--web.listen-address=127.0.0.1:9090" in args


def test_app_unit_has_what_the_deployment_relies_on():
    unit = parse_unit(SYSTEMD / "flaskapi.service")
    svc = unit["Service"]
    assert "network-online.target" in " ".join(unit["Unit"]["After"])
    assert "network-online.target" in " ".join(unit["Unit"]["Wants"])
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert one(unit, "Service", "User") == one(unit, "Service", "Group") == "flaskapi"
    assert one(unit, "Service", "Restart") == "always" and float(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "EnvironmentFile") == "/etc/flaskapi/flaskapi.env"
    assert one(unit, "Service", "WorkingDirectory") == "/opt/flaskapi/app"

    exec_start = shlex.split(one(unit, "Service", "ExecStart"))
    assert exec_start[0] == "/opt/flaskapi/venv/bin/gunicorn"
    config = exec_start[exec_start.index("-c") + 1]
    # The unit serves with the very file the test stack and `make run` use.
    assert config == "/opt/flaskapi/app/deploy/gunicorn.conf.py"
    assert (ROOT / Path(config).relative_to("/opt/flaskapi/app")).is_file()
    assert re.search(r'ROOT\s*/\s*"deploy"\s*/\s*"gunicorn.conf.py"', (ROOT / "bench" / "harness" / "gunicorn.py").read_text())
    assert "deploy/gunicorn.conf.py" in (ROOT / "Makefile").read_text()

    env = unit_environment(unit)
    metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]
    assert metrics_dir.startswith("/run/" + one(unit, "Service", "RuntimeDirectory") + "/")
    assert svc["ExecStartPre"] == [f"/bin/rm -rf {metrics_dir}", f"/bin/mkdir -p {metrics_dir}"]
    assert "PROMETHEUS_MULTIPROC_DIR" not in env_example_values(), "the env file would override the unit's"
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service", "KillMode") == "mixed"
    graceful = int(env_example_values().get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
    assert int(one(unit, "Service", "TimeoutStopSec")) > graceful

    log_dir = "/var/log/" + one(unit, "Service", "LogsDirectory")
    state_dir = "/var/lib/" + one(unit, "Service", "StateDirectory")
    assert env["LOG_DIR"] == env_example_values()["LOG_DIR"] == log_dir
    assert env["DATA_DIR"] == env_example_values()["DATA_DIR"] == state_dir
    writable = set(one(unit, "Service", "ReadWritePaths").split())
    assert writable == {log_dir, state_dir, "/run/" + one(unit, "Service", "RuntimeDirectory")}
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                 "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                 "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
                 "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "UMask": "0027"}
    assert {key: one(unit, "Service", key) for key in hardening} == hardening

    migrate = parse_unit(SYSTEMD / "flaskapi-migrate.service")
    assert one(migrate, "Service", "Type") == "oneshot"
    assert "flaskapi.service" in one(migrate, "Unit", "Before")
    assert shlex.split(one(migrate, "Service", "ExecStart"))[1:] == ["-m", "flask", "db", "upgrade"]
    for key in ("User", "Group", "WorkingDirectory", "EnvironmentFile"):
        assert one(migrate, "Service", key) == one(unit, "Service", key)


# =================================================================================================
# env.example and the README

def test_env_example_lists_exactly_the_readme_settings():
    names = env_example_names()
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"set twice in env.example: {duplicates}"
    documented = readme_settings()
    assert set(names) - documented == set(), "in env.example but not in README's Settings table"
    assert documented - set(names) == set(), "in README's Settings table but not in env.example"


def test_env_example_is_a_production_file_without_secrets():
    text = ENV_EXAMPLE.read_text()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            # Read the same by systemd, python-dotenv and docker: no quotes, spaces or comments.
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[^\s\"'#\\]*", line), f"env.example: {line!r}"
    values = env_example_values()
    assert values["JWT_SECRET_KEY"] == "" and values["DB_URI"] == ""
    assert "secrets.token_urlsafe" in text
    assert values["FLASK_ENV"] == "production"
    assert values["BIND"] == "127.0.0.1:5000"
    assert values["METRICS_BIND"].startswith("127.0.0.1:")
    assert re.search(r"^#.*METRICS_BIND=10\.0\.0\.10:9200", text, flags=re.M), "the private-address example"

    settings = Settings.from_env({**values, "JWT_SECRET_KEY": SECRET,
                                  "DB_URI": "postgresql://flaskapi:pw@10.0.0.20:5432/flaskapi?sslmode=require"})
    assert settings.is_production and not settings.crash_route_enabled
    assert str(settings.log_dir) == "/var/log/flaskapi"


def test_readme_describes_the_deployment_files():
    readme = (ROOT / "README.md").read_text()
    deployment = readme.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]
    assert readme.index("\n## Deployment\n") < readme.index("\n## Layout\n")
    for needle in ("create_db.sql", "pg_hba.conf.snippet", "install.sh", "/etc/flaskapi/flaskapi.env",
                   "systemctl reload flaskapi", "/var/log/flaskapi", "docker compose up",
                   "--scale locust-worker=", "9200", "5432"):
        assert needle in deployment, needle
    layout = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    for path in ("deploy/systemd/", "deploy/env.example", "deploy/postgres/", "deploy/nginx/",
                 "deploy/install.sh", "deploy/compose/", "Dockerfile", "docker-compose.yml"):
        assert f"`{path}" in layout, path


# =================================================================================================
# Postgres

def role_uri(handle, database: str, password: str = DB_PASSWORD) -> str:
    uri = handle.get_uri(database)
    assert uri.startswith("postgresql://postgres:@")
    return uri.replace("postgresql://postgres:", f"postgresql://flaskapi:{password}", 1)


def create_db(handle, database: str, password: str | None) -> str:
    preset = f"\\set db_name '{database}'\n"
    if password is not None:
        preset += f"\\set db_password '{password}'\n"
    return handle.psql(preset + CREATE_DB.read_text())


@pytest.fixture(scope="module")
def app_database(postgres):
    """A fresh database made by create_db.sql on the session's Postgres: (name, role URI)."""
    name = f"deploy_{uuid.uuid4().hex[:8]}"
    output = create_db(postgres, name, DB_PASSWORD)
    assert f'database "{name}" are ready' in output
    return name, role_uri(postgres, name)


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
    [role] = query(postgres, "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                             "rolbypassrls, rolinherit FROM pg_roles WHERE rolname = 'flaskapi'")
    assert role == (True, False, False, False, False, False, True)
    [(owner, encoding)] = query(postgres, "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding) "
                                          "FROM pg_database WHERE datname = %s", name)
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
    hba = [line.split() for line in (DEPLOY / "postgres" / "pg_hba.conf.snippet").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
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
        rules = query(handle, "SELECT line_number, type, database, user_name, address, netmask, auth_method, "
                              "error FROM pg_hba_file_rules WHERE line_number >= %s", first_hba_line)
        assert len(rules) == 1, rules
        *rule, error = rules[0]
        assert rule[1:] == ["hostssl", ["flaskapi"], ["flaskapi"], "10.0.0.10", "255.255.255.255", "scram-sha-256"]
        # hostssl needs ssl = on; this Postgres (pgserver's build) has no SSL at all.
        assert error is None or "SSL" in error, error
        rows = query(handle, "SELECT name, error FROM pg_file_settings WHERE sourcefile = %s AND sourceline >= %s",
                     str(pgdata / "postgresql.conf"), first_conf_line)
        assert {name for name, _ in rows} == set(settings)
        # listen_addresses takes a restart (and another address); ssl = on needs an SSL build.
        errors = {name: error for name, error in rows if error and name not in ("listen_addresses", "ssl")}
        assert errors == {}
    finally:
        handle.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


# =================================================================================================
# The units' commands, run as systemd would run them

def service_env(unit: dict, tmp: Path, extra: dict[str, str], env_file: dict[str, str]) -> dict[str, str]:
    """Environment= first, EnvironmentFile= over it (systemd's precedence), paths under tmp."""
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8", **unit_environment(unit), **env_file, **extra}
    return {key: rewritten_unit(value, tmp) for key, value in env.items()}


def test_unit_commands_migrate_serve_reload_and_stop(postgres, app_database, tmp_path):
    _, uri = app_database
    tmp = short_tmpdir("fa-unit-")
    app_unit = parse_unit(SYSTEMD / "flaskapi.service")
    migrate_unit = parse_unit(SYSTEMD / "flaskapi-migrate.service")
    port, metrics_port = free_port(), free_port()
    env_file = {**env_example_values(), "JWT_SECRET_KEY": SECRET, "DB_URI": uri,
                "BIND": f"127.0.0.1:{port}", "METRICS_BIND": f"127.0.0.1:{metrics_port}",
                "WEB_CONCURRENCY": "2"}
    # What systemd creates before running anything: RuntimeDirectory, LogsDirectory, StateDirectory.
    for key, base in (("RuntimeDirectory", "run"), ("LogsDirectory", "var/log"), ("StateDirectory", "var/lib")):
        (tmp / base / one(app_unit, "Service", key)).mkdir(parents=True, exist_ok=True)
    workdir = rewritten_unit(one(app_unit, "Service", "WorkingDirectory"))
    try:
        # 1. flaskapi-migrate.service: flask db upgrade, as the role create_db.sql made.
        env = service_env(migrate_unit, tmp, {}, env_file)
        result = run(shlex.split(rewritten_unit(one(migrate_unit, "Service", "ExecStart"), tmp)), cwd=workdir,
                     env=env, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        with psycopg2.connect(uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT tableowner FROM pg_tables WHERE tablename IN ('users', 'books')")
            assert cur.fetchall() == [("flaskapi",), ("flaskapi",)]
        conn.close()

        # 2. flaskapi.service: ExecStartPre empties the metrics dir (a stale file from a crash).
        env = service_env(app_unit, tmp, {}, env_file)
        metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
        metrics_dir.mkdir(parents=True, exist_ok=True)
        (metrics_dir / "counter_12345.db").write_bytes(b"stale")
        for command in app_unit["Service"]["ExecStartPre"]:
            run(shlex.split(rewritten_unit(command, tmp)), cwd=workdir, env=env)
        assert metrics_dir.is_dir() and not any(metrics_dir.iterdir())

        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp / "notify"))
        notify.settimeout(60)  # a deadline for READY=1, not a wait: it returns when it comes
        # Stopped as systemd stops it (KillMode=mixed): KillSignal to the master, then the rest.
        master = ManagedProcess(shlex.split(rewritten_unit(one(app_unit, "Service", "ExecStart"), tmp)),
                                cwd=workdir, env={**env, "NOTIFY_SOCKET": str(tmp / "notify")},
                                log_path=tmp_path / "gunicorn.out", name="flaskapi.service's gunicorn",
                                kill_mode="mixed").start()
        try:
            # Type=notify: gunicorn says READY=1 itself.
            try:
                message = notify.recv(4096).decode()
            finally:
                notify.close()
            assert "READY=1" in message
            assert master.wait_ready(f"http://127.0.0.1:{port}/readyz").json()["status"] == "ready"
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            assert scraped(metrics_url, "flaskapi_database_up") == 1
            before = wait_workers(master.pid, 2)

            # 3. systemctl reload: HUP to $MAINPID; the master stays, the workers are replaced.
            reload = rewritten_unit(one(app_unit, "Service", "ExecReload"), tmp).replace("$MAINPID", str(master.pid))
            run(shlex.split(reload))
            def replaced():
                pids = child_pids(master.pid)
                return pids if len(pids) == 2 and not pids & before else None

            after = wait_for(replaced, f"2 new workers replacing {before}")
            assert master.poll() is None, master.output()[-3000:]
            assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            wait_for(lambda: scraped(metrics_url, "flaskapi_worker_exits_total") >= 2, "the 2 old workers' exits")
            assert scraped(metrics_url, "flaskapi_worker_exits_total") == 2  # old workers, clean exits
            assert scraped(metrics_url, "flaskapi_worker_restarts_total") == 0

            # A crash after the reload is still seen and counted by the master.
            os.kill(sorted(after)[0], signal.SIGKILL)
            wait_for(lambda: scraped(metrics_url, "flaskapi_worker_restarts_total") >= 1, "the killed worker's restart")
            assert scraped(metrics_url, "flaskapi_worker_restarts_total") == 1

            # 4. systemctl stop: KillSignal to the master, done within TimeoutStopSec. A bound that
            # holds on a slow machine: an idle master stops in well under a second, TimeoutStopSec is 30 s.
            assert one(app_unit, "Service", "KillSignal") == "SIGTERM"
            started = time.monotonic()
            code = master.stop(timeout=float(one(app_unit, "Service", "TimeoutStopSec")))
            assert code == 0 and time.monotonic() - started < float(one(app_unit, "Service", "TimeoutStopSec"))
        finally:
            master.stop(20)
        app_log = Path(env["LOG_DIR"]) / env["LOG_FILE"]
        assert '"event": "worker_died"' in app_log.read_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# =================================================================================================
# nginx

def nginx_config(tmp: Path, site: str) -> Path:
    (tmp / "logs").mkdir(exist_ok=True)
    (tmp / "site.conf").write_text(site.replace("/var/log/nginx/", f"{tmp}/logs/"))
    temp_paths = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(
        f"{user}pid {tmp}/nginx.pid;\nerror_log {tmp}/logs/error.log;\nevents {{}}\n"
        f"http {{\n  {temp_paths}\n  access_log {tmp}/logs/access.log;\n  include {tmp}/site.conf;\n}}\n")
    return tmp / "nginx.conf"


class Nginx(ManagedProcess):
    """nginx in the foreground on a config under `prefix`, stopped as nginx is stopped
    gracefully: SIGQUIT to the master, which lets its workers finish."""

    name = "nginx"
    stop_signal = signal.SIGQUIT
    stop_timeout = 10.0
    kill_mode = "mixed"

    def __init__(self, prefix: Path, config: Path) -> None:
        super().__init__([tool("nginx"), "-p", prefix, "-e", prefix / "logs" / "error.log", "-c", config,
                          "-g", "daemon off;"], log_path=prefix / "nginx.out")


def test_nginx_accepts_the_site(tmp_path):
    config = nginx_config(tmp_path, NGINX_SITE.read_text())
    result = run([tool("nginx"), "-t", "-p", tmp_path, "-e", tmp_path / "logs" / "error.log", "-c", config])
    output = result.stdout + result.stderr
    assert "test is successful" in output
    assert not re.search(r"\[(warn|emerg|alert|crit|error)\]", output), output


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """The upstream: answers every request with the headers (and body size) it received."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    def _answer(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_nginx_proxies_with_request_ids_forwarded_headers_and_json_errors(tmp_path):
    upstream_port, port = free_port(), free_port()
    site = (NGINX_SITE.read_text()
            .replace("server 127.0.0.1:5000;", f"server 127.0.0.1:{upstream_port};")
            .replace("listen 80 default_server;", f"listen 127.0.0.1:{port} default_server;")
            .replace("listen [::]:80 default_server;", ""))
    assert f"127.0.0.1:{upstream_port}" in site and f"127.0.0.1:{port}" in site
    config = nginx_config(tmp_path, site)
    nginx = Nginx(tmp_path, config).start()
    upstream = None
    try:
        url = f"http://127.0.0.1:{port}"
        # Upstream down: nginx's own 502, in the app's error shape, with a request id.
        def answer():
            assert nginx.poll() is None, nginx.output()
            try:  # in a list: a Response is falsy when its status is 4xx/5xx
                return [requests.get(url + "/books/", timeout=10)]
            except requests.ConnectionError:  # not listening yet
                return None

        [response] = wait_for(answer, f"nginx to answer on {url}")
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "bad_gateway" and re.fullmatch(r"[0-9a-f]{32}", error["request_id"])
        assert response.headers["X-Request-ID"] == error["request_id"]

        upstream = http.server.ThreadingHTTPServer(("127.0.0.1", upstream_port), EchoHandler)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()

        seen = requests.get(url + "/books/", timeout=5).json()
        assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"])  # generated when absent
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
        seen = requests.get(url + "/", headers={"X-Request-ID": "client-id.42:a_b-c",
                                                "X-Forwarded-For": "203.0.113.9"}, timeout=5).json()
        assert seen["x-request-id"] == "client-id.42:a_b-c"  # a sane client id passes through
        assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        seen = requests.get(url + "/", headers={"X-Request-ID": "no spaces allowed"}, timeout=5).json()
        assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"])  # one the app would reject is replaced

        # client_max_body_size = MAX_CONTENT_LENGTH: 65536 bytes pass, one more is refused here.
        limit = int(env_example_values()["MAX_CONTENT_LENGTH"])
        assert requests.post(url + "/books/", data=b"x" * limit, timeout=5).json()["content-length"] == str(limit)
        response = requests.post(url + "/books/", data=b"x" * (limit + 1), headers={"X-Request-ID": "big-1"},
                                 timeout=5)
        assert response.status_code == 413
        assert response.json()["error"] == {"status": 413, "code": "payload_too_large", "details": {},
                                             "message": f"Request body is larger than the {limit} bytes allowed",
                                             "request_id": "big-1"}
        # nginx's access log has the same id (written just after the response: wait for it).
        def logged_413s():
            access = [json.loads(line) for line in (tmp_path / "logs" / "flaskapi.access.log").read_text().splitlines()]
            return [entry["request_id"] for entry in access if entry["status"] == 413]

        assert wait_for(logged_413s, "the 413 in nginx's access log") == ["big-1"]

        # Timeouts: nginx waits longer than gunicorn lets a worker run.
        read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", NGINX_SITE.read_text()).group(1))
        assert read_timeout > int(env_example_values()["GUNICORN_TIMEOUT"])
        assert "client_max_body_size 64k;" in NGINX_SITE.read_text() and limit == 64 * 1024
        assert "9200" not in re.sub(r"#.*", "", NGINX_SITE.read_text())  # no route to the metrics port
        assert nginx.stop() == 0, f"nginx did not stop gracefully within {Nginx.stop_timeout}s:\n{nginx.output()}"
    finally:
        if upstream is not None:
            upstream.shutdown()
            upstream.server_close()
        nginx.stop()


# =================================================================================================
# install.sh

def test_shell_scripts_are_shellcheck_clean():
    run([tool("shellcheck"), INSTALL, DEPLOY / "compose" / "postgres-init.sh"])
    assert INSTALL.read_text().splitlines()[:1] == ["#!/usr/bin/env bash"]
    assert "\nset -euo pipefail\n" in INSTALL.read_text()
    assert os.access(INSTALL, os.X_OK) and os.access(DEPLOY / "compose" / "postgres-init.sh", os.X_OK)


def install(*args: str) -> subprocess.CompletedProcess:
    return run([INSTALL, *args], timeout=60, env={**os.environ, "LC_ALL": "C"})


def test_install_into_a_root_builds_the_tree_and_is_idempotent(tmp_path):
    root = tmp_path / "root"
    first = install("--root", str(root), "--no-venv")
    assert "skipped (--root)" in first.stdout and "apt-get" in first.stdout
    assert "NOT STARTED" in first.stderr and "JWT_SECRET_KEY" in first.stderr and "DB_URI" in first.stderr

    app = root / "opt/flaskapi/app"
    for path in ("service/__init__.py", "migrations/env.py", "deploy/gunicorn.conf.py", "logging_conf/__init__.py",
                 "pyproject.toml", ".flaskenv"):
        assert (app / path).is_file(), path
    for absent in (".git", ".venv", ".data", "logs", ".env", "service/__pycache__", "app.new"):
        assert not (app / absent).exists(), absent
    assert not (root / "opt/flaskapi/app.new").exists() and not (root / "opt/flaskapi/app.old").exists()
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_text() == (SYSTEMD / unit).read_text()
    env_file = root / "etc/flaskapi/flaskapi.env"
    assert env_file.read_text() == ENV_EXAMPLE.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/flaskapi").stat().st_mode) == 0o750
    site = root / "etc/nginx/sites-enabled/flaskapi.conf"
    assert site.is_symlink() and site.resolve() == (root / "etc/nginx/sites-available/flaskapi.conf").resolve()
    assert site.read_text() == NGINX_SITE.read_text()

    # Second run: the edited settings survive (mode restored), the code is replaced.
    env_file.write_text(env_file.read_text().replace("JWT_SECRET_KEY=\n", f"JWT_SECRET_KEY={SECRET}\n")
                        .replace("DB_URI=\n", "DB_URI=postgresql://flaskapi:pw@10.0.0.20/flaskapi\n"))
    env_file.chmod(0o644)
    (app / "stale-file").write_text("from an older release")
    second = install("--root", str(root), "--no-venv")
    assert "NOT STARTED" not in second.stderr
    assert "skipped (--root): systemctl start flaskapi-migrate" in second.stdout
    assert f"JWT_SECRET_KEY={SECRET}\n" in env_file.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert not (app / "stale-file").exists()


def test_install_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    root = tmp_path / "root"
    result = install("--root", str(root), "--dry-run", "--no-venv")
    assert not root.exists()
    assert f"+ install -m 0640 {DEPLOY}/env.example {root}/etc/flaskapi/flaskapi.env" in result.stdout

    watched = (Path("/opt/flaskapi"), Path("/etc/flaskapi"), Path("/etc/systemd/system/flaskapi.service"))
    existed = {p: p.exists() for p in watched}
    result = install("--dry-run")
    expected = ["+ apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates nginx",
                "+ /opt/flaskapi/venv/bin/pip install --quiet --no-cache-dir /opt/flaskapi/app.new",
                "+ mv /opt/flaskapi/app.new /opt/flaskapi/app",
                "+ chown root:flaskapi /etc/flaskapi /etc/flaskapi/flaskapi.env",
                "+ install -m 0644 " + str(SYSTEMD / "flaskapi.service") + " /etc/systemd/system/flaskapi.service",
                "+ systemctl daemon-reload", "+ nginx -t -q", "+ systemctl reload-or-restart nginx"]
    if subprocess.run(["getent", "group", "flaskapi"], capture_output=True).returncode != 0:
        expected.append("+ groupadd --system flaskapi")  # not on a machine where it is installed for real
    if not Path("/opt/flaskapi/venv/bin/python").exists():
        expected.append("+ python3 -m venv /opt/flaskapi/venv")
    for line in expected:
        assert line in result.stdout, line
    assert {p: p.exists() for p in watched} == existed


# =================================================================================================
# docker compose and the image

def test_compose_config_is_valid_and_needs_a_jwt_secret(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = {k: v for k, v in os.environ.items() if k != "JWT_SECRET_KEY"}
    command = [*compose_binary(), "--env-file", empty, "-f", COMPOSE, "config", "-q"]
    run(command, cwd=ROOT, env={**base, "JWT_SECRET_KEY": SECRET}, timeout=60)
    refused = run(command, cwd=ROOT, env=base, timeout=60, check=False)
    assert refused.returncode != 0 and "set JWT_SECRET_KEY" in refused.stdout + refused.stderr
    assert "${JWT_SECRET_KEY:?" in COMPOSE.read_text()


def test_compose_mounts_existing_paths_and_publishes_only_loopback_ports():
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "app", "prometheus", "grafana", "locust-master", "locust-worker"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / "Dockerfile").exists() and build["target"] in dockerfile_stages()

    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[name] = int(host_port)
    assert published == {"app": 5000, "prometheus": 9090, "grafana": 3000, "locust-master": 8089}
    assert "9200" not in json.dumps({n: s.get("ports", []) for n, s in services.items()})

    assert services["migrate"]["command"] == ["python", "-m", "flask", "db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["app"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["postgres"]["image"] == "postgres:16" and "healthcheck" in services["postgres"]
    master, worker = services["locust-master"], services["locust-worker"]
    assert master["environment"]["LOCUST_METRICS_BIND"] == "0.0.0.0:9646" and "--master" in master["command"]
    assert worker["command"][-3:] == ["--worker", "--master-host", "locust-master"]
    assert "container_name" not in worker and worker["deploy"]["replicas"] >= 1
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana_mounts["./monitoring/grafana/dashboards"] == "/var/lib/grafana/dashboards/flaskapi"
    provider = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/dashboards/flaskapi.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/flaskapi"
    assert grafana_mounts["./deploy/compose/grafana/datasource.yml"] == \
        "/etc/grafana/provisioning/datasources/prometheus.yml"


def without_targets(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static.pop("targets")
    return config


def test_compose_prometheus_is_the_repo_config_with_other_targets(tmp_path):
    repo = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    ours = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert without_targets(ours) == without_targets(repo)
    targets = {job["job_name"]: [t for s in job["static_configs"] for t in s["targets"]]
               for job in ours["scrape_configs"]}
    assert targets == {"flaskapi": ["app:9200"], "locust": ["locust-master:9646"], "prometheus": ["localhost:9090"]}
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/compose/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./monitoring/rules"] == "/etc/prometheus/rules"
    # As mounted: the rules next to the config, checked by promtool.
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(ROOT / "monitoring" / "rules", tmp_path / "rules")
    run([tool("promtool"), "check", "config", tmp_path / "prometheus.yml"])


def test_compose_grafana_datasource_differs_from_the_repo_one_only_in_its_url():
    repo = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    ours = yaml.safe_load((DEPLOY / "compose" / "grafana" / "datasource.yml").read_text())
    assert ours["datasources"][0].pop("url") == "http://prometheus:9090"
    repo["datasources"][0].pop("url")
    assert ours == repo


def test_dockerfile_and_dockerignore():
    stages = dockerfile_stages()
    app = stages["app"]
    assert list(stages)[-1] == "app", "the default build target is the API"
    assert app[0] == ("FROM", "python:3.11-slim")
    user = last(app, "USER")
    assert user not in ("root", "0")
    env = dockerfile_env(app)
    assert env["BIND"] == "0.0.0.0:5000" and env["METRICS_BIND"] == "0.0.0.0:9200"
    assert env["FLASK_ENV"] == "production" and env["PROMETHEUS_MULTIPROC_DIR"]
    assert "/healthz" in last(app, "HEALTHCHECK") and "urllib" in last(app, "HEALTHCHECK")
    assert "gunicorn -c deploy/gunicorn.conf.py" in last(app, "CMD")

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv", ".data", ".env", "logs", "reports", ".pytest_cache"):
        assert must in patterns, must
    for needed in ("service", "logging_conf", "migrations", "deploy", "pyproject.toml", "README.md", "locustfile.py"):
        assert needed not in patterns, f"{needed} is needed in the image"


def test_image_cmd_and_healthcheck_serve_like_the_container(app_database, tmp_path):
    """The app stage's ENV + compose's environment, then its CMD and HEALTHCHECK as written (with
    loopback ports instead of 0.0.0.0, and this venv on PATH instead of the image's)."""
    _, uri = app_database
    app = dockerfile_stages()["app"]
    port, metrics_port = free_port(), free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "gauge_livesum_999.db").write_bytes(b"stale from the previous container run")
    compose_env = {k: str(v) for k, v in compose()["services"]["app"]["environment"].items()
                   if "${" not in str(v)}
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", **dockerfile_env(app), **compose_env,
           "DB_URI": uri, "JWT_SECRET_KEY": SECRET, "WEB_CONCURRENCY": "1",
           "BIND": f"127.0.0.1:{port}", "METRICS_BIND": f"127.0.0.1:{metrics_port}",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    assert env["LOG_TO_FILE"] == "0"
    cmd = json.loads(last(app, "CMD"))
    healthcheck = json.loads(last(app, "HEALTHCHECK").split(" CMD ", 1)[1])
    # Stopped as `docker stop` stops a container: SIGTERM to its main process.
    container = ManagedProcess(cmd, env=env, log_path=tmp_path / "container.out", name="the image's CMD",
                               ready_url=f"http://127.0.0.1:{port}/healthz", kill_mode="mixed")
    container.start()
    try:
        result = run(healthcheck, env=env, timeout=10, check=False)
        assert result.returncode == 0, result.stderr
        assert scraped(f"http://127.0.0.1:{metrics_port}/metrics", "flaskapi_database_up") == 1
        assert not (metrics_dir / "gauge_livesum_999.db").exists()
        assert container.stop(20) == 0
        assert run(healthcheck, env=env, timeout=10, check=False).returncode != 0
    finally:
        container.stop(20)
