"""deploy/env.example, the settings file an operator edits: exactly the settings of docs/settings.md, read
the same by systemd, python-dotenv and docker, a production configuration without secrets; and
docs/deployment.md describing the deployment files."""

from __future__ import annotations

import re

from bench.harness.environment import ROOT
from service.settings import Settings
from tests.deploy_files import ENV_EXAMPLE, SECRET, documented_settings, env_example_names, env_example_values


def test_env_example_lists_exactly_the_documented_settings():
    names = env_example_names()
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"set twice in env.example: {duplicates}"
    documented = documented_settings()
    assert set(names) - documented == set(), "in env.example but not in docs/settings.md"
    assert documented - set(names) == set(), "in docs/settings.md but not in env.example"


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

    settings = Settings.from_env(
        {
            **values,
            "JWT_SECRET_KEY": SECRET,
            "DB_URI": "postgresql://flaskapi:pw@10.0.0.20:5432/flaskapi?sslmode=require",
        }
    )
    assert settings.is_production and not settings.crash_route_enabled
    assert str(settings.log_dir) == "/var/log/flaskapi"


def test_the_docs_describe_the_deployment_files():
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    assert "docs/deployment.md" in (ROOT / "README.md").read_text()  # the front door links it
    for needle in (
        "create_db.sql",
        "pg_hba.conf.snippet",
        "install.sh",
        "/etc/flaskapi/flaskapi.env",
        "systemctl reload flaskapi",
        "/var/log/flaskapi",
        "docker compose up",
        "--scale locust-worker=",
        "9200",
        "5432",
    ):
        assert needle in deployment, needle
    layout = (ROOT / "docs" / "architecture.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    for path in (
        "deploy/systemd/",
        "deploy/env.example",
        "deploy/postgres/",
        "deploy/nginx/",
        "deploy/install.sh",
        "deploy/compose/",
        "Dockerfile",
        "docker-compose.yml",
    ):
        assert f"`{path}" in layout, path
