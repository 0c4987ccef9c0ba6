"""deploy/install.sh: shellcheck, and real runs with --root (the tree it builds, a second run
that keeps the edited settings) and --dry-run (every step printed, nothing changed)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import yaml

from tests.deploy_files import DEPLOY, ENV_EXAMPLE, INSTALL, NGINX_SITE, SECRET, SYSTEMD, UNITS
from tests.deploy_tools import run, tool


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
    for path in (
        "service/__init__.py",
        "migrations/env.py",
        "deploy/gunicorn.conf.py",
        "logging_conf/__init__.py",
        "pyproject.toml",
        ".flaskenv",
    ):
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
    env_file.write_text(
        env_file.read_text()
        .replace("JWT_SECRET_KEY=\n", f"JWT_SECRET_KEY={SECRET}\n")
        .replace("DB_URI=\n", "DB_URI=postgresql://flaskapi:pw@10.0.0.20/flaskapi\n")
    )
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
    expected = [
        "+ apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates nginx",
        "+ /opt/flaskapi/venv/bin/pip install --quiet --no-cache-dir /opt/flaskapi/app.new",
        "+ mv /opt/flaskapi/app.new /opt/flaskapi/app",
        "+ chown root:flaskapi /etc/flaskapi /etc/flaskapi/flaskapi.env",
        "+ install -m 0644 " + str(SYSTEMD / "flaskapi.service") + " /etc/systemd/system/flaskapi.service",
        "+ systemctl daemon-reload",
        "+ nginx -t -q",
        "+ systemctl reload-or-restart nginx",
    ]
    if subprocess.run(["getent", "group", "flaskapi"], capture_output=True, check=False).returncode != 0:
        expected.append("+ groupadd --system flaskapi")  # not on a machine where it is installed for real
    if not Path("/opt/flaskapi/venv/bin/python").exists():
        expected.append("+ python3 -m venv /opt/flaskapi/venv")
    for line in expected:
        assert line in result.stdout, line
    assert {p: p.exists() for p in watched} == existed


EXPORTERS = Path("etc/flaskapi-exporters")
QUERIES = DEPLOY.parent / "monitoring" / "postgres-exporter"


def drop_in(unit: str) -> Path:
    return Path("etc/systemd/system") / f"{unit}.service.d" / "flaskapi.conf"


def test_app_host_gets_the_node_exporter_on_its_private_address(tmp_path):
    root = tmp_path / "root"
    result = install("--root", str(root), "--no-venv", "--exporter-address", "10.0.0.10")
    assert "skipped (--root): apt-get install prometheus-node-exporter" in result.stdout
    assert (root / drop_in("prometheus-node-exporter")).read_text() == (
        SYSTEMD / "prometheus-node-exporter.service.d" / "flaskapi.conf"
    ).read_text()
    assert not (root / drop_in("prometheus-postgres-exporter")).exists()
    settings = (root / EXPORTERS / "exporters.env").read_text()
    assert "EXPORTER_ADDRESS=10.0.0.10\n" in settings
    # a later run without the flag keeps the address
    install("--root", str(root), "--no-venv")
    assert (root / EXPORTERS / "exporters.env").read_text() == settings

    bare = tmp_path / "bare"
    result = install("--root", str(bare), "--no-venv", "--no-exporters")
    assert "exporters" not in result.stdout and not (bare / EXPORTERS).exists()


def test_database_host_gets_both_exporters_their_queries_and_the_role(tmp_path):
    root = tmp_path / "root"
    result = install("--root", str(root), "--role", "db-host", "--exporter-address", "10.0.0.20")
    assert "prometheus-node-exporter prometheus-postgres-exporter" in result.stdout
    assert "skipped (--root): psql: the exporter's role" in result.stdout
    assert not (root / "opt/flaskapi").exists(), "the database host gets no app"
    for unit in ("prometheus-node-exporter", "prometheus-postgres-exporter"):
        assert (root / drop_in(unit)).read_text() == (SYSTEMD / f"{unit}.service.d" / "flaskapi.conf").read_text()
    assert (root / EXPORTERS / "queries.yml").read_text() == (QUERIES / "queries.yml").read_text()
    settings = (root / EXPORTERS / "exporters.env").read_text()
    assert "EXPORTER_ADDRESS=10.0.0.20\n" in settings and "DATA_SOURCE_NAME='user=prometheus " in settings
    assert "password" not in settings.lower()

    with_statements = tmp_path / "statements"
    install("--root", str(with_statements), "--role", "db-host", "--pg-stat-statements")
    assert (with_statements / EXPORTERS / "queries.yml").read_text() == (QUERIES / "queries.yml").read_text() + (
        QUERIES / "statements.yml"
    ).read_text()
    # one queries file, both queries in it
    assert set(yaml.safe_load((with_statements / EXPORTERS / "queries.yml").read_text())) == {
        "pg_lock_waits",
        "pg_slow_statements",
    }
    refused = run([INSTALL, "--root", str(tmp_path / "x"), "--pg-stat-statements"], check=False, timeout=60)
    assert refused.returncode != 0 and "--pg-stat-statements is for --role db-host" in refused.stderr


def test_the_nginx_host_gets_one_upstream_server_per_app_host(tmp_path):
    """--app-hosts: the site's one server line becomes one per app host, each with its health
    check (port 5000 unless given); the rest of the site is the repo's, line for line."""
    root = tmp_path / "root"
    install("--root", str(root), "--no-venv", "--no-exporters", "--app-hosts", "10.0.0.11,10.0.0.12:5001")
    site = (root / "etc/nginx/sites-available/flaskapi.conf").read_text()
    repo = NGINX_SITE.read_text()
    line = "    server 127.0.0.1:5000 max_fails=1 fail_timeout=5s;\n"
    assert line in repo
    servers = [
        f"    server {address} max_fails=1 fail_timeout=5s;\n" for address in ("10.0.0.11:5000", "10.0.0.12:5001")
    ]
    assert site == repo.replace(line, "".join(servers))
    # without it, the repo's site as it is
    install("--root", str(root), "--no-venv", "--no-exporters")
    assert (root / "etc/nginx/sites-available/flaskapi.conf").read_text() == repo
    refused = run([INSTALL, "--root", str(tmp_path / "x"), "--app-hosts", "10.0.0.11;rm"], check=False, timeout=60)
    assert refused.returncode != 0 and "--app-hosts: not an address" in refused.stderr


def test_the_monitoring_host_gets_the_config_the_rules_and_the_app_targets(tmp_path):
    root = tmp_path / "root"
    result = install("--root", str(root), "--role", "monitoring", "--app-hosts", "10.0.0.11,10.0.0.12")
    assert "skipped (--root): apt-get install prometheus" in result.stdout
    assert not (root / "opt/flaskapi").exists(), "the monitoring host gets no app"
    config = root / "etc/prometheus/flaskapi"
    monitoring = DEPLOY.parent / "monitoring"
    assert (config / "prometheus.yml").read_text() == (monitoring / "prometheus.yml").read_text()
    assert sorted(p.name for p in (config / "rules").iterdir()) == sorted(
        p.name for p in (monitoring / "rules").glob("*.rules.yml")
    )
    assert yaml.safe_load((config / "targets/flaskapi.yml").read_text()) == [
        {"targets": ["10.0.0.11:9200"], "labels": {"host": "app-1"}},
        {"targets": ["10.0.0.12:9200"], "labels": {"host": "app-2"}},
    ]
    assert (root / drop_in("prometheus")).read_text() == (
        SYSTEMD / "prometheus.service.d" / "flaskapi.conf"
    ).read_text()
    assert "targets/node.yml" in result.stdout  # the exporters' files are the operator's
    # promtool reads it as installed (the exporters' files written as the docs say)
    for job in ("node", "postgres"):
        (config / f"targets/{job}.yml").write_text((monitoring / "targets" / f"{job}.yml").read_text())
    run([tool("promtool"), "check", "config", config / "prometheus.yml"])
    refused = run([INSTALL, "--root", str(tmp_path / "x"), "--role", "monitoring"], check=False, timeout=60)
    assert refused.returncode != 0 and "--role monitoring needs --app-hosts" in refused.stderr
