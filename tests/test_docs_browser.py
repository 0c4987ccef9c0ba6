"""/docs rendered by a real browser (headless Chromium) in a network namespace that has loopback
and nothing else: Swagger UI must build every operation of the document from the service's own
files alone, and the browser must ask for nothing but the service's origin. The page, as the
browser drew it, is left in the test's tmp dir (docs.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench.harness.environment import ROOT

OPERATION = re.compile(r'opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', re.S)
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def browser() -> str:
    found = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    assert found, "headless Chromium is not installed: apt-get install chromium-headless-shell (make system-deps)"
    return found


def requested_urls(net_log: Path) -> set[str]:
    """Every URL in Chromium's net log, less those that never touch a network (data:, blob:)."""
    events = json.loads(net_log.read_text())["events"]
    urls = {event["params"]["url"] for event in events if "url" in event.get("params", {})}
    return {url for url in urls if not url.startswith(("data:", "blob:"))}


def test_docs_render_with_no_network_but_loopback(make_app, database_uri, tmp_path):
    unshare = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    run = subprocess.run(
        [*unshare, sys.executable, "-m", "tests.programs.docs_offline", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "TEST_DB_URI": database_uri, "TEST_TMP": str(tmp_path), "CHROMIUM": browser()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["outside_reachable"] is None, result  # the namespace really had loopback only
    assert result["screenshot_status"] == result["dom_status"] == 0, result["stderr"]
    origin = result["origin"]
    requested = requested_urls(tmp_path / "net.json")
    assert {f"{origin}/docs", f"{origin}/openapi.json", f"{origin}/docs/assets/swagger-ui-bundle.js"} <= requested
    assert {url for url in requested if not url.startswith(origin + "/")} == set(), requested

    paths = make_app().test_client().get("/openapi.json").get_json()["paths"]
    documented = {(method.upper(), path) for path, item in paths.items() for method in item if method in HTTP_METHODS}
    rendered = set(OPERATION.findall((tmp_path / "dom.html").read_text()))
    assert rendered == documented and len(documented) >= 10, (rendered, documented)
    assert (tmp_path / "docs.png").stat().st_size > 10_000  # a blank page is ~8 KB
    print(f"\n/docs as Chromium drew it with no network: {tmp_path / 'docs.png'}")
