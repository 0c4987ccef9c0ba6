"""Log shipping's deployment files with the real tools: each rsyslog config reads only settings its
systemd unit (or the env file install.sh writes) gives, and `rsyslogd -N1` accepts it with them;
`systemd-analyze verify` on both units; install.sh --role log-host and --log-host into a --root
tree and as a --dry-run; the compose services that ship the app's log volume."""

from __future__ import annotations

import os
import re
import shutil
import stat

import pytest
from dotenv import dotenv_values

from bench.harness.environment import ROOT
from bench.harness.rsyslog import CENTRAL_CONF, FORWARD_CONF, LOGROTATE_CENTRAL, RSYSLOG_DIR, RSYSLOGD
from tests.deploy_files import DEPLOY, INSTALL, SYSTEMD, compose, dockerfile_stages, one, parse_unit, unit_environment
from tests.deploy_tools import run, tool

LOGSHIP_UNIT = SYSTEMD / "flaskapi-logship.service"
LOGHOST_UNIT = SYSTEMD / "flaskapi-loghost.service"
LOGHOST_ENV = RSYSLOG_DIR / "loghost.env.example"


def settings_read(config) -> set[str]:
    """The environment variables a config reads (rsyslog's `echo $VAR` constants, outside comments)."""
    text = "\n".join(line for line in config.read_text().splitlines() if not line.lstrip().startswith("#"))
    return {name for echo in re.findall(r"`echo ([^`]*)`", text) for name in re.findall(r"\$(\w+)", echo)}


def test_each_config_reads_only_what_its_unit_sets():
    ship = unit_environment(parse_unit(LOGSHIP_UNIT))
    assert settings_read(FORWARD_CONF) == set(ship) | {"LOG_HOST"}  # LOG_HOST: logship.env, from --log-host
    assert ship["LOGSHIP_HOSTNAME"] == "%H" and ship["LOGSHIP_ROTATED"] == "/var/log/flaskapi/app.log.*[0-9]"
    host = unit_environment(parse_unit(LOGHOST_UNIT))
    env_file = {k for k, v in dotenv_values(LOGHOST_ENV).items() if v is not None}
    assert settings_read(CENTRAL_CONF) == set(host) | env_file
    assert env_file == {"CENTRAL_LISTEN"}


@pytest.mark.parametrize("unit, config", [(LOGSHIP_UNIT, FORWARD_CONF), (LOGHOST_UNIT, CENTRAL_CONF)])
def test_rsyslogd_accepts_each_config_with_its_units_settings(unit, config, tmp_path):
    if not RSYSLOGD.exists():
        pytest.fail("rsyslog is not installed: apt-get install rsyslog rsyslog-relp", pytrace=False)
    env = {k: v.replace("%H", "app-1") for k, v in unit_environment(parse_unit(unit)).items()}
    for name in ("LOGSHIP_STATE_DIR", "CENTRAL_STATE_DIR"):  # must exist; the unit's StateDirectory= makes it
        if name in env:
            env[name] = str(tmp_path)
    env.update(LOG_HOST="10.0.0.40", CENTRAL_LISTEN="10.0.0.40")
    result = run([RSYSLOGD, "-N1", "-f", config], env={**os.environ, **env}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    command = one(parse_unit(unit), "Service", "ExecStart").split()
    assert command[:4] == [str(RSYSLOGD), "-n", "-f", command[3]] and "-i" in command


def test_units_verify_without_a_single_warning(tmp_path):
    for unit in (LOGSHIP_UNIT, LOGHOST_UNIT):
        shutil.copy(unit, tmp_path / unit.name)
    result = run([tool("systemd-analyze"), "verify", "--man=no", *sorted(tmp_path.iterdir())], check=False)
    assert (result.stdout + result.stderr).strip() == "" and result.returncode == 0, result.stdout + result.stderr
    ship, host = parse_unit(LOGSHIP_UNIT), parse_unit(LOGHOST_UNIT)
    assert one(ship, "Service", "User") == "flaskapi"  # the owner of /var/log/flaskapi
    assert one(ship, "Service", "EnvironmentFile") == "/etc/flaskapi/logship.env"
    assert one(host, "Service", "User") == "flaskapi-logs"
    assert one(host, "Service", "LogsDirectory") == "flaskapi-central"
    # logrotate signals the receiver through this pid file, as its `su` user (the unit's).
    assert "/run/flaskapi-loghost/rsyslogd.pid" in one(host, "Service", "ExecStart")
    assert "su flaskapi-logs flaskapi-logs" in LOGROTATE_CENTRAL.read_text()


def install(*args: str):
    return run([INSTALL, *args], timeout=60, env={**os.environ, "LC_ALL": "C"}, check=False)


def test_install_log_host_into_a_root(tmp_path):
    root = tmp_path / "root"
    first = install("--role", "log-host", "--root", str(root))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "NOT STARTED" in first.stderr and "CENTRAL_LISTEN" in first.stderr
    installed = {
        "etc/flaskapi-loghost/central.conf": (CENTRAL_CONF, 0o644),
        "usr/local/lib/flaskapi-loghost/central_lines.py": (RSYSLOG_DIR / "central_lines.py", 0o755),
        "etc/logrotate.d/flaskapi-central": (LOGROTATE_CENTRAL, 0o644),
        "etc/lnav/formats/flaskapi/flaskapi_log.json": (DEPLOY / "lnav" / "flaskapi_log.json", 0o644),
        "etc/systemd/system/flaskapi-loghost.service": (LOGHOST_UNIT, 0o644),
        "etc/flaskapi-loghost/loghost.env": (LOGHOST_ENV, 0o644),
    }
    for path, (source, mode) in installed.items():
        assert (root / path).read_text() == source.read_text(), path
        assert stat.S_IMODE((root / path).stat().st_mode) == mode, path
    assert not (root / "opt").exists()  # nothing of the app on the log host

    env_file = root / "etc/flaskapi-loghost/loghost.env"
    env_file.write_text(env_file.read_text().replace("CENTRAL_LISTEN=\n", "CENTRAL_LISTEN=10.0.0.40\n"))
    second = install("--role", "log-host", "--root", str(root))
    assert second.returncode == 0 and "NOT STARTED" not in second.stderr
    assert "skipped (--root): systemctl enable + restart flaskapi-loghost" in second.stdout
    assert "CENTRAL_LISTEN=10.0.0.40\n" in env_file.read_text()  # kept

    dry = install("--role", "log-host", "--dry-run")
    assert "+ apt-get install -y -q --no-install-recommends rsyslog rsyslog-relp python3 logrotate lnav" in dry.stdout
    for refused in (["--role", "db"], ["--role", "log-host", "--log-host", "10.0.0.40"]):
        result = install(*refused, "--dry-run")
        assert result.returncode != 0 and "install.sh:" in result.stderr, refused


def test_install_app_host_with_log_shipping(tmp_path):
    root = tmp_path / "root"
    result = install("--root", str(root), "--no-venv", "--log-host", "10.0.0.40")
    assert result.returncode == 0, result.stdout + result.stderr
    conf = root / "etc/flaskapi"
    assert (conf / "logship.conf").read_text() == FORWARD_CONF.read_text()
    assert dotenv_values(conf / "logship.env") == {"LOG_HOST": "10.0.0.40", "LOG_HOST_PORT": "2514"}
    for name in ("logship.conf", "logship.env"):
        assert stat.S_IMODE((conf / name).stat().st_mode) == 0o640, name
    assert (root / "etc/systemd/system/flaskapi-logship.service").read_text() == LOGSHIP_UNIT.read_text()

    install("--root", str(root), "--no-venv", "--log-host", "[fd00::40]:6514")
    assert dotenv_values(conf / "logship.env") == {"LOG_HOST": "fd00::40", "LOG_HOST_PORT": "6514"}

    dry = install("--dry-run", "--log-host", "10.0.0.40")
    for line in (
        "+ apt-get install -y -q --no-install-recommends rsyslog rsyslog-relp",
        "+ systemctl enable --quiet flaskapi-logship.service",
        "+ systemctl restart flaskapi-logship.service",
    ):
        assert line in dry.stdout, line
    assert "logship" not in install("--dry-run").stdout  # only when asked


def test_compose_ships_the_apps_log_volume_to_the_log_host():
    services = compose()["services"]
    app, logship, loghost = services["app"], services["logship"], services["loghost"]
    assert app["environment"]["LOG_TO_FILE"] == "1"
    assert f"app-logs:{app['environment']['LOG_DIR']}" in app["volumes"]
    assert f"app-logs:{logship['environment']['LOGSHIP_FILE'].rsplit('/', 1)[0]}:ro" in logship["volumes"]
    # Each config gets every setting it reads, and reads its settings from the mounted repo file.
    assert set(logship["environment"]) == settings_read(FORWARD_CONF)
    assert set(loghost["environment"]) == settings_read(CENTRAL_CONF)
    assert "./deploy/rsyslog/forward.conf:/etc/flaskapi/logship.conf:ro" in logship["volumes"]
    assert "./deploy/rsyslog/central.conf:/etc/flaskapi-loghost/central.conf:ro" in loghost["volumes"]
    lines = f"./deploy/rsyslog/central_lines.py:{loghost['environment']['CENTRAL_LINES']}:ro"
    assert lines in loghost["volumes"]
    assert logship["environment"]["LOG_HOST"] == "loghost" and "ports" not in loghost
    # The forwarder reads the app's files as their owner: the app image's flaskapi uid.
    assert "--uid 10001" in (ROOT / "Dockerfile").read_text() and logship["user"] == "10001:10001"
    stages = dockerfile_stages(RSYSLOG_DIR / "Dockerfile")
    assert logship["build"] == {"context": "deploy/rsyslog", "target": "rsyslog"} and "rsyslog" in stages
