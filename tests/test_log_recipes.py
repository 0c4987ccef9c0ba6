"""The shell recipes of docs/logging.md, run as written (with jq and sort) on a log file, so a
recipe that reads well but answers wrong fails here: `sort -t, -k1 -rn` on `[99.177,...` compared
the text `[99.177` and put 9.8 above 84.2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from bench.harness.environment import ROOT

LOGGING_DOC = ROOT / "docs" / "logging.md"


def recipe(comment: str) -> str:
    """The command under `# <comment>` in the doc's recipe block (continuation lines joined)."""
    text = LOGGING_DOC.read_text()
    match = re.search(r"^# " + re.escape(comment) + r"[^\n]*\n((?:.*\\\n)*.*)\n", text, re.MULTILINE)
    assert match, f"no recipe '# {comment}' in {LOGGING_DOC}"
    return match.group(1)


def access(duration_ms: float, path: str) -> str:
    fields = {"method": "GET", "path": path, "status": 200, "request_id": path}
    return json.dumps({"event": "access", "duration_ms": duration_ms, **fields})


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (.ci/system-deps.sh installs it)")
def test_the_slowest_requests_recipe_sorts_by_duration_as_a_number(tmp_path):
    durations = [99.177, 9.8, 84.2, 7.9, 1203.5, 100.0, 0.4]
    (tmp_path / "logs").mkdir()
    lines = [access(d, f"/books/{i}") for i, d in enumerate(durations)]
    lines.insert(3, json.dumps({"event": "worker_died", "level": "ERROR"}))  # not an access line: left out
    (tmp_path / "logs" / "app.log").write_text("\n".join(lines) + "\n")
    command = recipe("the 10 slowest requests")
    result = subprocess.run(
        ["bash", "-c", command], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    printed = [float(line.split("\t")[0]) for line in result.stdout.splitlines()]
    assert printed == sorted(durations, reverse=True)


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (.ci/system-deps.sh installs it)")
def test_the_trace_recipe_lists_every_line_of_that_trace_and_no_other(tmp_path):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"  # the id the recipe is written with
    lines = [
        {"timestamp": "t1", "level": "INFO", "event": "access", "message": "GET / 200", "trace_id": "0" * 31 + "1"},
        {"timestamp": "t2", "level": "ERROR", "event": "unhandled_exception", "message": "boom", "trace_id": trace},
        {"timestamp": "t3", "level": "ERROR", "event": "access", "message": "GET /x 500", "trace_id": trace},
    ]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (tmp_path / "logs" / "app.log.2026-12-01").write_text(json.dumps({**lines[1], "timestamp": "t0"}) + "\n")
    result = subprocess.run(
        ["bash", "-c", recipe("every line of one trace")],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    printed = sorted(json.loads(line)[0] for line in result.stdout.splitlines())
    assert printed == ["t0", "t2", "t3"]  # the rotated file too
