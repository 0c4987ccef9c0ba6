"""The deployment files, found and read the way their own tools read them (systemd's unit
format, python-dotenv, the Dockerfile's instructions, compose's YAML), and create_db.sql run as
an operator runs it; shared by the test_deploy_* files."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import yaml
from dotenv import dotenv_values

from bench.harness.environment import ROOT

DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNITS = ["flaskapi.service", "flaskapi-migrate.service"]
ENV_EXAMPLE = DEPLOY / "env.example"
CREATE_DB = DEPLOY / "postgres" / "create_db.sql"
NGINX_SITE = DEPLOY / "nginx" / "flaskapi.conf"
INSTALL = DEPLOY / "install.sh"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# What an operator puts in env.example's empty JWT_SECRET_KEY: 64 hex characters, as random as
# production's guard asks (a repeated letter is refused).
SECRET = hashlib.sha256(b"flaskapi-observability deploy test key").hexdigest()
DB_PASSWORD = "deploy-test-password-0123456789"


# --- systemd units ----------------------------------------------------------------------------


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


# --- env.example and the settings table of docs/settings.md ----------------------------------------------


def env_example_names() -> list[str]:
    """Names set (`NAME=`) or documented with their default (`#NAME=`) in env.example."""
    return re.findall(r"^#?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M)


def env_example_values() -> dict[str, str]:
    return {k: v for k, v in dotenv_values(ENV_EXAMPLE).items() if v is not None}


def documented_settings() -> set[str]:
    """The names in the settings table of docs/settings.md (the page is the table)."""
    names = set()
    for line in (ROOT / "docs" / "settings.md").read_text().splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    assert len(names) > 30, names
    return names


# --- the Dockerfile and the compose file ------------------------------------------------------


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """{stage: [(INSTRUCTION, arguments)]} with line continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
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


# --- create_db.sql ------------------------------------------------------------------------------


def role_uri(handle, database: str, password: str = DB_PASSWORD) -> str:
    uri = handle.get_uri(database)
    assert uri.startswith("postgresql://postgres:@")
    return uri.replace("postgresql://postgres:", f"postgresql://flaskapi:{password}", 1)


def create_db(handle, database: str, password: str | None) -> str:
    preset = f"\\set db_name '{database}'\n"
    if password is not None:
        preset += f"\\set db_password '{password}'\n"
    return handle.psql(preset + CREATE_DB.read_text())
