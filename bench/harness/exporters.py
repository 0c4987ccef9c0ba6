"""The host and database exporters from Debian's packages (prometheus-node-exporter,
prometheus-postgres-exporter) as plain processes on loopback, and the file_sd target files that
make Prometheus find them and the app instances (monitoring/prometheus.yml, jobs `node`,
`postgres` and `flaskapi`)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

from bench.harness.environment import ROOT
from bench.harness.process import ManagedProcess

NODE_EXPORTER = "prometheus-node-exporter"
POSTGRES_EXPORTER = "prometheus-postgres-exporter"
QUERIES = ROOT / "monitoring" / "postgres-exporter" / "queries.yml"
# What the Hosts row reads, and nothing else: the default set also probes hardware, RAID and
# NFS, which needs root or is slow in a container, and a test has no use for it.
NODE_COLLECTORS = ("cpu", "loadavg", "meminfo", "diskstats", "filesystem", "netdev", "uname", "stat", "time")
# The targets' files, relative to the Prometheus config (the jobs' file_sd_configs).
TARGET_FILES = {"flaskapi": "targets/flaskapi.yml", "node": "targets/node.yml", "postgres": "targets/postgres.yml"}


def binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if path is None:
        raise RuntimeError(f"{name} is not installed: apt-get install {name} (Debian/Ubuntu; .ci/system-deps.sh)")
    return path


def node_exporter(port: int, log_path: Path | None = None) -> ManagedProcess:
    """The node exporter on 127.0.0.1:`port` with only the collectors the dashboard reads; a
    context manager, ready once /metrics answers."""
    collectors = [f"--collector.{name}" for name in NODE_COLLECTORS]
    return ManagedProcess(
        [binary(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults", *collectors],
        log_path=log_path,
        ready_url=f"http://127.0.0.1:{port}/metrics",
        name="node exporter",
    )


def postgres_exporter(dsn: str, port: int, log_path: Path | None = None) -> ManagedProcess:
    """The Postgres exporter on 127.0.0.1:`port` reading `dsn` (a libpq URI or key=value string),
    with the repo's queries (monitoring/postgres-exporter/queries.yml); ready once /metrics
    answers, which it does before it has reached the database (pg_up says whether it has)."""
    env = {**os.environ, "DATA_SOURCE_NAME": dsn}
    return ManagedProcess(
        [binary(POSTGRES_EXPORTER), f"--web.listen-address=127.0.0.1:{port}", f"--extend.query-path={QUERIES}"],
        log_path=log_path,
        env=env,
        ready_url=f"http://127.0.0.1:{port}/metrics",
        name="postgres exporter",
    )


def libpq_dsn(sqlalchemy_uri: str) -> str:
    """The project's SQLAlchemy URI (postgresql+psycopg2://...) as libpq, which the exporter's
    Go driver reads, takes it: the driver name dropped."""
    scheme, rest = sqlalchemy_uri.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def write_targets(config_dir: Path, job: str, hosts: dict[str, str]) -> Path:
    """The file_sd file of `job` under `config_dir` (where the Prometheus config is): one
    target group per host, {host: "address:port"}, each labelled with its `host`. Prometheus
    reads it again when it changes."""
    path = config_dir / TARGET_FILES[job]
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = [{"targets": [address], "labels": {"host": host}} for host, address in hosts.items()]
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump(groups, sort_keys=False))
    temporary.replace(path)  # whole or not at all: Prometheus may read it at any moment
    return path


@contextlib.contextmanager
def host_and_database(
    workdir: Path, db_uri: str, node_port: int, postgres_port: int, host: str = "localhost"
) -> Iterator[None]:
    """Both exporters of a one-host run, and their target files written for the Prometheus whose
    config is in `workdir` (bench/harness/prometheus.py writes it there): `host` runs them all."""
    with (
        node_exporter(node_port, workdir / "node-exporter.out"),
        postgres_exporter(libpq_dsn(db_uri), postgres_port, workdir / "postgres-exporter.out"),
    ):
        write_targets(workdir, "node", {host: f"127.0.0.1:{node_port}"})
        write_targets(workdir, "postgres", {host: f"127.0.0.1:{postgres_port}"})
        yield
