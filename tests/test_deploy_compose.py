"""docker-compose.yml and the Dockerfile: `docker-compose config -q`, the host paths it mounts,
its published ports (only the edge publishes the API), its nginx, Prometheus, Alertmanager and
Grafana files against the repo's (the site rendered, promtool, amtool), and the image's CMD and
HEALTHCHECK run against a real gunicorn."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from bench.harness.environment import ROOT, free_port
from bench.harness.nginx import COMPOSE_SITE, render_compose
from bench.harness.process import ManagedProcess
from bench.harness.scrape import metric, scrape
from tests.deploy_files import COMPOSE, DEPLOY, SECRET, compose, dockerfile_env, dockerfile_stages, last
from tests.deploy_tools import VENV_BIN, run, tool


def compose_binary() -> list[str]:
    """Compose v2 (`docker compose`) when the plugin is there, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    return [tool("docker-compose")]


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
    assert set(services) == {
        "postgres",
        "migrate",
        "app",
        "nginx",
        "prometheus",
        "alertmanager",
        "grafana",
        "locust-master",
        "locust-worker",
        "logship",
        "loghost",
        "node-exporter",
        "postgres-exporter",
    }
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
        build = service.get("build")
        if build:
            dockerfile = ROOT / build["context"] / "Dockerfile"
            assert dockerfile.exists() and build["target"] in dockerfile_stages(dockerfile)

    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip, host_port, _container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[name] = int(host_port)
    # The API only through the edge: gunicorn's port is on the compose network, never the host's.
    assert published == {
        "nginx": 8080,
        "prometheus": 9090,
        "alertmanager": 9093,
        "grafana": 3000,
        "locust-master": 8089,
    }
    assert "ports" not in services["app"] and services["nginx"]["ports"] == ["127.0.0.1:8080:80"]
    assert "9200" not in json.dumps({n: s.get("ports", []) for n, s in services.items()})
    assert "5000" not in json.dumps({n: s.get("ports", []) for n, s in services.items()})

    assert services["migrate"]["command"] == ["python", "-m", "flask", "db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["app"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["postgres"]["image"] == "postgres:16" and "healthcheck" in services["postgres"]
    assert services["nginx"]["depends_on"] == {"app": {"condition": "service_healthy"}}
    assert services["app"]["environment"]["TRUSTED_PROXIES"] == "1"  # nginx is one hop in front
    master, worker = services["locust-master"], services["locust-worker"]
    # The load generator is a client like any other: through the edge.
    assert master["command"][-2:] == ["--host", "http://nginx"]
    assert master["depends_on"] == {"nginx": {"condition": "service_healthy"}}
    assert master["environment"]["LOCUST_METRICS_BIND"] == "0.0.0.0:9646" and "--master" in master["command"]
    assert worker["command"][-3:] == ["--worker", "--master-host", "locust-master"]
    assert "container_name" not in worker and worker["deploy"]["replicas"] >= 1
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana_mounts["./monitoring/grafana/dashboards"] == "/var/lib/grafana/dashboards/flaskapi"
    provider = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/dashboards/flaskapi.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/flaskapi"
    assert (
        grafana_mounts["./deploy/compose/grafana/datasource.yml"]
        == "/etc/grafana/provisioning/datasources/prometheus.yml"
    )


def test_compose_nginx_is_the_site_rendered_for_the_app_service():
    """The site of deploy/nginx/flaskapi.conf with only the upstream (app:5000), the listen (port
    80, IPv4) and the log files changed: regenerated with `python -m bench.harness.nginx compose`."""
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["nginx"]["volumes"])
    assert mounts == {"./deploy/compose/nginx.conf": "/etc/nginx/conf.d/default.conf"}
    assert COMPOSE_SITE.read_text() == render_compose(), (
        "deploy/compose/nginx.conf differs from deploy/nginx/flaskapi.conf rendered: run "
        "`python -m bench.harness.nginx compose`"
    )
    text = COMPOSE_SITE.read_text()
    assert (
        "server app:5000 max_fails=1 fail_timeout=5s;" in text
        and "listen 80 default_server;" in text
        and "[::]" not in text
    )
    assert "/var/log/nginx" not in text and "access_log /dev/stdout flaskapi_json;" in text
    healthcheck = compose()["services"]["nginx"]["healthcheck"]["test"]
    assert healthcheck[0] == "CMD" and "http://127.0.0.1/healthz" in healthcheck


def without_targets(config: dict) -> dict:
    """The config without where its targets are: the static ones' addresses, and the app's
    discovery (a file as deployed, DNS under compose, test_compose_finds_every_app_container)."""
    config = json.loads(json.dumps(config))
    for job in config["scrape_configs"] + config["alerting"]["alertmanagers"]:
        for static in job.get("static_configs", []):
            static.pop("targets")
        if job.get("job_name") == "flaskapi":
            for key in ("file_sd_configs", "dns_sd_configs", "relabel_configs"):
                job.pop(key, None)
    return config


def test_compose_prometheus_is_the_repo_config_with_other_targets(tmp_path):
    repo = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    ours = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert without_targets(ours) == without_targets(repo)
    targets = {
        job["job_name"]: [t for s in job.get("static_configs", []) for t in s["targets"]]
        for job in ours["scrape_configs"]
    }
    # the exporters' jobs read the same target files, from the compose directory
    for job in ours["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            targets[job["job_name"]] = [
                t
                for f in sd["files"]
                for g in yaml.safe_load((DEPLOY / "compose" / f).read_text())
                for t in g["targets"]
            ]
    assert targets == {
        "flaskapi": [],  # found by DNS: below
        "locust": ["locust-master:9646"],
        "prometheus": ["localhost:9090"],
        "node": ["node-exporter:9100"],
        "postgres": ["postgres-exporter:9187"],
    }
    assert [a["static_configs"][0]["targets"] for a in ours["alerting"]["alertmanagers"]] == [["alertmanager:9093"]]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/compose/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./monitoring/rules"] == "/etc/prometheus/rules"
    assert mounts["./deploy/compose/targets"] == "/etc/prometheus/targets"
    # As mounted: the rules next to the config, checked by promtool.
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(ROOT / "monitoring" / "rules", tmp_path / "rules")
    shutil.copytree(DEPLOY / "compose" / "targets", tmp_path / "targets")
    run([tool("promtool"), "check", "config", tmp_path / "prometheus.yml"])


def test_compose_finds_every_app_container(tmp_path):
    """`--scale app=N`: Prometheus asks compose's DNS for the service's A records (one per
    container) on the metrics port, and labels each with its address as `host`."""
    ours = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    (job,) = [j for j in ours["scrape_configs"] if j["job_name"] == "flaskapi"]
    assert job["dns_sd_configs"] == [{"names": ["app"], "type": "A", "port": 9200}]
    assert "file_sd_configs" not in job and "static_configs" not in job
    (relabel,) = job["relabel_configs"]
    assert relabel["source_labels"] == ["__address__"] and relabel["target_label"] == "host"
    assert re.fullmatch(relabel["regex"], "172.18.0.5:9200").group(1) == "172.18.0.5"
    assert compose()["services"]["app"].get("container_name") is None  # or it could not scale
    assert "ports" not in compose()["services"]["app"]  # a published port could not scale either


def test_compose_alertmanager_is_the_repo_config_with_its_templates(tmp_path):
    service = compose()["services"]["alertmanager"]
    mounts = dict(v.split(":")[:2] for v in service["volumes"])
    assert mounts["./monitoring/alertmanager.yml"] == "/etc/alertmanager/alertmanager.yml"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in service["command"]
    assert "--cluster.listen-address=" in service["command"]
    # As mounted: the templates where the config's relative path finds them, checked by amtool.
    config_dir = Path(mounts["./monitoring/alertmanager.yml"]).parent
    templates = Path(mounts["./monitoring/alertmanager"])
    shutil.copy(ROOT / "monitoring" / "alertmanager.yml", tmp_path / "alertmanager.yml")
    shutil.copytree(ROOT / "monitoring" / "alertmanager", tmp_path / templates.relative_to(config_dir))
    output = run([tool("amtool"), "check-config", tmp_path / "alertmanager.yml"]).stdout
    assert "1 templates" in output, output
    patterns = yaml.safe_load((tmp_path / "alertmanager.yml").read_text())["templates"]
    assert all(list(tmp_path.glob(pattern)) for pattern in patterns), "the templates are not where the config says"


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

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
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
    compose_env = {k: str(v) for k, v in compose()["services"]["app"]["environment"].items() if "${" not in str(v)}
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        **dockerfile_env(app),
        **compose_env,
        "DB_URI": uri,
        "JWT_SECRET_KEY": SECRET,
        "WEB_CONCURRENCY": "1",
        "BIND": f"127.0.0.1:{port}",
        "METRICS_BIND": f"127.0.0.1:{metrics_port}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    # The image writes no file; compose turns it on for log shipping, here into tmp_path.
    assert dockerfile_env(app)["LOG_TO_FILE"] == "0" and env["LOG_TO_FILE"] == "1"
    env["LOG_DIR"] = str(tmp_path / "logs")
    cmd = json.loads(last(app, "CMD"))
    healthcheck = json.loads(last(app, "HEALTHCHECK").split(" CMD ", 1)[1])
    # Stopped as `docker stop` stops a container: SIGTERM to its main process.
    container = ManagedProcess(
        cmd,
        env=env,
        log_path=tmp_path / "container.out",
        name="the image's CMD",
        ready_url=f"http://127.0.0.1:{port}/healthz",
        kill_mode="mixed",
    )
    container.start()
    try:
        result = run(healthcheck, env=env, timeout=10, check=False)
        assert result.returncode == 0, result.stderr
        assert metric(scrape(f"http://127.0.0.1:{metrics_port}/metrics"), "flaskapi_database_up") == 1
        assert not (metrics_dir / "gauge_livesum_999.db").exists()
        assert container.stop(20) == 0
        assert run(healthcheck, env=env, timeout=10, check=False).returncode != 0
    finally:
        container.stop(20)


def test_compose_exporters_are_debians_versions_on_the_compose_network():
    """The exporters of a host install, at the versions Debian bookworm packages: the same
    metrics and the same queries file; scraped on the compose network, never published."""
    services = compose()["services"]
    node, database = services["node-exporter"], services["postgres-exporter"]
    assert node["image"] == "prom/node-exporter:v1.5.0"
    assert database["image"].endswith("/postgres-exporter:v0.11.1")
    assert "ports" not in node and "ports" not in database
    mounts = dict(v.split(":")[:2] for v in database["volumes"])
    assert mounts["./monitoring/postgres-exporter/queries.yml"] == "/etc/postgres-exporter/queries.yml"
    assert "--extend.query-path=/etc/postgres-exporter/queries.yml" in database["command"]
    assert "@postgres:5432/" in database["environment"]["DATA_SOURCE_NAME"]
    assert database["depends_on"] == {"postgres": {"condition": "service_healthy"}}
