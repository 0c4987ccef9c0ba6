"""The systemd units, checked with the real tools and run here as systemd would run them.

`systemd-analyze verify` on every unit and the monitoring host's drop-ins for Prometheus and
Alertmanager (any warning line fails),
then the units' own commands executed in order, as systemd would with their
Environment=/EnvironmentFile=: migrations as the database role create_db.sql makes, gunicorn
telling READY=1 on a NOTIFY_SOCKET, a reload (HUP) that keeps the master, a graceful stop
within TimeoutStopSec.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import time
from pathlib import Path

import psutil
import psycopg2
import pytest
import requests

from bench.harness.environment import ROOT, free_port
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from bench.harness.scrape import metric, scrape
from tests.deploy_files import SECRET, SYSTEMD, UNITS, env_example_values, one, parse_unit, unit_environment
from tests.deploy_tools import VENV_BIN, run, short_tmpdir, tool


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
    (tmp_path / "flaskapi.service").write_text(
        (tmp_path / "flaskapi.service").read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n")
    )
    assert "NoSuchKey" in verify([tmp_path / "flaskapi.service"])


# The drop-ins for Debian's units: the unit, its package, and the flags the drop-in must set.
DROP_INS = {
    "prometheus.service": (
        "prometheus",
        ["--config.file=/etc/prometheus/flaskapi/prometheus.yml", "--web.listen-address=127.0.0.1:9090"],
    ),
    "prometheus-alertmanager.service": (
        "prometheus-alertmanager",
        [
            "--config.file=/etc/prometheus/flaskapi/alertmanager.yml",
            "--web.listen-address=127.0.0.1:9093",
            "--cluster.listen-address=",
        ],
    ),
    # Every host's exporter, and the database host's (deploy/install.sh installs them).
    "prometheus-node-exporter.service": ("prometheus-node-exporter", ["--web.listen-address=${EXPORTER_ADDRESS}:9100"]),
    "prometheus-postgres-exporter.service": (
        "prometheus-postgres-exporter",
        ["--web.listen-address=${EXPORTER_ADDRESS}:9187", "--extend.query-path=/etc/flaskapi-exporters/queries.yml"],
    ),
}


@pytest.mark.parametrize("unit", DROP_INS)
def test_monitoring_drop_in_verifies_on_the_distribution_unit(tmp_path, unit):
    package, flags = DROP_INS[unit]
    base = next((p for d in ("/lib/systemd/system", "/usr/lib/systemd/system") if (p := Path(d) / unit).exists()), None)
    if base is None:
        tool(package)
        pytest.fail(
            f"{package} is installed but not its systemd unit: install Debian's `{package}` package", pytrace=False
        )
    drop_in = SYSTEMD / f"{unit}.d" / "flaskapi.conf"
    shutil.copy(base, tmp_path / unit)
    (tmp_path / f"{unit}.d").mkdir()
    shutil.copy(drop_in, tmp_path / f"{unit}.d" / "flaskapi.conf")
    output = verify([tmp_path / unit])
    assert output == "", f"systemd-analyze verify:\n{output}"

    # The drop-in is read (a bad key in it is reported), so the clean result above covers it.
    (tmp_path / f"{unit}.d" / "flaskapi.conf").write_text(drop_in.read_text() + "NoSuchKey=1\n")
    assert "flaskapi.conf" in verify([tmp_path / unit])

    exec_start = parse_unit(drop_in)["Service"]["ExecStart"]
    assert exec_start[0] == "", "ExecStart= must be reset before it is replaced"
    args = shlex.split(exec_start[1])
    assert args[0] == f"/usr/bin/{package}"
    for flag in flags:
        assert flag in args, flag
    assert args[-1] == "$ARGS", "the distribution's /etc/default file is still read"


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
    assert re.search(
        r'ROOT\s*/\s*"deploy"\s*/\s*"gunicorn.conf.py"', (ROOT / "bench" / "harness" / "gunicorn.py").read_text()
    )
    # `make run` execs gunicorn with the harness's CONFIG (bench/serve.py).
    assert "-m bench.serve" in (ROOT / "Makefile").read_text()
    assert "from bench.harness.gunicorn import CONFIG, GUNICORN" in (ROOT / "bench" / "serve.py").read_text()

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
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "UMask": "0027",
    }
    assert {key: one(unit, "Service", key) for key in hardening} == hardening

    migrate = parse_unit(SYSTEMD / "flaskapi-migrate.service")
    assert one(migrate, "Service", "Type") == "oneshot"
    assert "flaskapi.service" in one(migrate, "Unit", "Before")
    assert shlex.split(one(migrate, "Service", "ExecStart"))[1:] == ["-m", "flask", "db", "upgrade"]
    for key in ("User", "Group", "WorkingDirectory", "EnvironmentFile"):
        assert one(migrate, "Service", key) == one(unit, "Service", key)


# --- the units' commands, run as systemd would run them ---------------------------------------


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
    env_file = {
        **env_example_values(),
        "JWT_SECRET_KEY": SECRET,
        "DB_URI": uri,
        "BIND": f"127.0.0.1:{port}",
        "METRICS_BIND": f"127.0.0.1:{metrics_port}",
        "WEB_CONCURRENCY": "2",
    }
    # What systemd creates before running anything: RuntimeDirectory, LogsDirectory, StateDirectory.
    for key, base in (("RuntimeDirectory", "run"), ("LogsDirectory", "var/log"), ("StateDirectory", "var/lib")):
        (tmp / base / one(app_unit, "Service", key)).mkdir(parents=True, exist_ok=True)
    workdir = rewritten_unit(one(app_unit, "Service", "WorkingDirectory"))
    try:
        # 1. flaskapi-migrate.service: flask db upgrade, as the role create_db.sql made.
        env = service_env(migrate_unit, tmp, {}, env_file)
        result = run(
            shlex.split(rewritten_unit(one(migrate_unit, "Service", "ExecStart"), tmp)),
            cwd=workdir,
            env=env,
            timeout=60,
            check=False,
        )
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
        master = ManagedProcess(
            shlex.split(rewritten_unit(one(app_unit, "Service", "ExecStart"), tmp)),
            cwd=workdir,
            env={**env, "NOTIFY_SOCKET": str(tmp / "notify")},
            log_path=tmp_path / "gunicorn.out",
            name="flaskapi.service's gunicorn",
            kill_mode="mixed",
        ).start()
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
