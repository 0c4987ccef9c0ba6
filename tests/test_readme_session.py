"""The README's curl session, pasted into bash as written, against a real gunicorn: every status
it promises (`# 201` after a call) is the status the service answers, in order. The README is a
new user's first contact; a walkthrough that drifted from the service fails here."""

from __future__ import annotations

import re
import subprocess

import pytest

from bench.harness.environment import ROOT, stack_env
from bench.harness.gunicorn import Gunicorn

pytestmark = pytest.mark.stack

# What `-w '%{http_code}\n'` prints: the status alone on its line (every body ends with a newline).
STATUS_COMMENT = re.compile(r"^# (\d{3})$")
STATUS_PRINTED = re.compile(r"^(\d{3})$")


def curl_session() -> str:
    """The first sh block under "## The API in curl"."""
    section = ROOT.joinpath("README.md").read_text().split("## The API in curl", 1)[1]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


def test_the_session_promises_a_status_for_the_calls_it_shows():
    promised = [m.group(1) for line in curl_session().splitlines() if (m := STATUS_COMMENT.match(line))]
    assert len(promised) >= 10, promised  # the parser below reads what the README says
    assert {"200", "201", "204", "401", "404", "415", "422"} <= set(promised)


def test_the_readme_curl_session_runs_as_written(migrated_database, tmp_path):
    env = stack_env(migrated_database("test_readme_session"), tmp_path, LOG_CONSOLE="0")
    with Gunicorn(env, workers=1, log_path=tmp_path / "g.out") as stack:
        script = curl_session()
        script = script.replace("http://127.0.0.1:5000", stack.url).replace(
            "127.0.0.1:9200", f"127.0.0.1:{stack.metrics_port}"
        )
        result = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
        )
    assert result.returncode == 0, result.stderr
    promised = [m.group(1) for line in curl_session().splitlines() if (m := STATUS_COMMENT.match(line))]
    answered = [m.group(1) for line in result.stdout.splitlines() if (m := STATUS_PRINTED.match(line))]
    assert answered == promised, (answered, promised, result.stdout)
    assert "flask_http_request_total{" in result.stdout  # the last line: the metrics port answered
