"""The real tools the deploy tests run: found on PATH (or in the sbin directories), or the test
fails with the apt-get line that installs them, never skips; run with a timeout, a failure
showing what they printed.

Needs systemd-analyze (systemd), nginx, shellcheck, docker-compose, prometheus/promtool and
prometheus-alertmanager/amtool (`apt-get install --no-install-recommends systemd nginx shellcheck
docker-compose prometheus prometheus-alertmanager`).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent  # stands in for the deployment's /opt/flaskapi/venv/bin

APT = {
    "systemd-analyze": "systemd",
    "nginx": "nginx",
    "shellcheck": "shellcheck",
    "docker-compose": "docker-compose",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
}


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (p := Path(d) / name).exists()), None
    )
    if path is None:
        pytest.fail(
            f"`{name}` not found: install it with `apt-get install --no-install-recommends "
            f"{APT[name]}` (Debian/Ubuntu). The CI script must install it.",
            pytrace=False,
        )
    return path


def run(args: list[str], *, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check:
        assert result.returncode == 0, (
            f"{shlex.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def short_tmpdir(prefix: str) -> Path:
    """Unix socket paths are limited to ~108 bytes: pytest's tmp_path can be too long."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
