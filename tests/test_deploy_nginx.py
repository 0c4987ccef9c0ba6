"""deploy/nginx: `nginx -t` on the site, then a real nginx in front of a header-echoing upstream
(request ids, forwarded headers, the body size limit, nginx's own errors in the app's shape)."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import threading
from pathlib import Path

import requests

from bench.harness.environment import free_port
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess
from tests.deploy_files import NGINX_SITE, env_example_values
from tests.deploy_tools import run, tool


def nginx_config(tmp: Path, site: str) -> Path:
    (tmp / "logs").mkdir(exist_ok=True)
    (tmp / "site.conf").write_text(site.replace("/var/log/nginx/", f"{tmp}/logs/"))
    temp_paths = " ".join(
        f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(
        f"{user}pid {tmp}/nginx.pid;\nerror_log {tmp}/logs/error.log;\nevents {{}}\n"
        f"http {{\n  {temp_paths}\n  access_log {tmp}/logs/access.log;\n  include {tmp}/site.conf;\n}}\n"
    )
    return tmp / "nginx.conf"


class Nginx(ManagedProcess):
    """nginx in the foreground on a config under `prefix`, stopped as nginx is stopped
    gracefully: SIGQUIT to the master, which lets its workers finish."""

    name = "nginx"
    stop_signal = signal.SIGQUIT
    stop_timeout = 10.0
    kill_mode = "mixed"

    def __init__(self, prefix: Path, config: Path) -> None:
        super().__init__(
            [tool("nginx"), "-p", prefix, "-e", prefix / "logs" / "error.log", "-c", config, "-g", "daemon off;"],
            log_path=prefix / "nginx.out",
        )


def test_nginx_accepts_the_site(tmp_path):
    config = nginx_config(tmp_path, NGINX_SITE.read_text())
    result = run([tool("nginx"), "-t", "-p", tmp_path, "-e", tmp_path / "logs" / "error.log", "-c", config])
    output = result.stdout + result.stderr
    assert "test is successful" in output
    assert not re.search(r"\[(warn|emerg|alert|crit|error)\]", output), output


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """The upstream: answers every request with the headers (and body size) it received."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    def _answer(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_nginx_proxies_with_request_ids_forwarded_headers_and_json_errors(tmp_path):
    upstream_port, port = free_port(), free_port()
    site = (
        NGINX_SITE.read_text()
        .replace("server 127.0.0.1:5000;", f"server 127.0.0.1:{upstream_port};")
        .replace("listen 80 default_server;", f"listen 127.0.0.1:{port} default_server;")
        .replace("listen [::]:80 default_server;", "")
    )
    assert f"127.0.0.1:{upstream_port}" in site and f"127.0.0.1:{port}" in site
    config = nginx_config(tmp_path, site)
    nginx = Nginx(tmp_path, config).start()
    upstream = None
    try:
        url = f"http://127.0.0.1:{port}"

        # Upstream down: nginx's own 502, in the app's error shape, with a request id.
        def answer():
            assert nginx.poll() is None, nginx.output()
            try:  # in a list: a Response is falsy when its status is 4xx/5xx
                return [requests.get(url + "/books/", timeout=10)]
            except requests.ConnectionError:  # not listening yet
                return None

        [response] = wait_for(answer, f"nginx to answer on {url}")
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "bad_gateway" and re.fullmatch(r"[0-9a-f]{32}", error["request_id"])
        assert response.headers["X-Request-ID"] == error["request_id"]

        upstream = http.server.ThreadingHTTPServer(("127.0.0.1", upstream_port), EchoHandler)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()

        seen = requests.get(url + "/books/", timeout=5).json()
        assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"])  # generated when absent
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
        seen = requests.get(
            url + "/", headers={"X-Request-ID": "client-id.42:a_b-c", "X-Forwarded-For": "203.0.113.9"}, timeout=5
        ).json()
        assert seen["x-request-id"] == "client-id.42:a_b-c"  # a sane client id passes through
        assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        seen = requests.get(url + "/", headers={"X-Request-ID": "no spaces allowed"}, timeout=5).json()
        assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"])  # one the app would reject is replaced

        # client_max_body_size = MAX_CONTENT_LENGTH: 65536 bytes pass, one more is refused here.
        limit = int(env_example_values()["MAX_CONTENT_LENGTH"])
        assert requests.post(url + "/books/", data=b"x" * limit, timeout=5).json()["content-length"] == str(limit)
        response = requests.post(url + "/books/", data=b"x" * (limit + 1), headers={"X-Request-ID": "big-1"}, timeout=5)
        assert response.status_code == 413
        assert response.json()["error"] == {
            "status": 413,
            "code": "payload_too_large",
            "details": {},
            "message": f"Request body is larger than the {limit} bytes allowed",
            "request_id": "big-1",
        }

        # nginx's access log has the same id (written just after the response: wait for it).
        def logged_413s():
            access = [json.loads(line) for line in (tmp_path / "logs" / "flaskapi.access.log").read_text().splitlines()]
            return [entry["request_id"] for entry in access if entry["status"] == 413]

        assert wait_for(logged_413s, "the 413 in nginx's access log") == ["big-1"]

        # Timeouts: nginx waits longer than gunicorn lets a worker run.
        read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", NGINX_SITE.read_text()).group(1))
        assert read_timeout > int(env_example_values()["GUNICORN_TIMEOUT"])
        assert "client_max_body_size 64k;" in NGINX_SITE.read_text() and limit == 64 * 1024
        assert "9200" not in re.sub(r"#.*", "", NGINX_SITE.read_text())  # no route to the metrics port
        assert nginx.stop() == 0, f"nginx did not stop gracefully within {Nginx.stop_timeout}s:\n{nginx.output()}"
    finally:
        if upstream is not None:
            upstream.shutdown()
            upstream.server_close()
        nginx.stop()
