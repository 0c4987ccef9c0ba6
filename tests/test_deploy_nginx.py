"""deploy/nginx: `nginx -t` on the site (alone, and inside Debian's own nginx.conf), then a real
nginx in front of a header-echoing upstream (request ids, forwarded headers, the body size limit,
nginx's own errors in the app's shape). The edge against the real app and hostile clients:
tests/test_edge.py."""

from __future__ import annotations

import http.server
import json
import os
import re
import threading
from pathlib import Path

import requests

from bench.harness.environment import free_port
from bench.harness.nginx import Nginx, render
from bench.harness.polling import wait_for
from tests.deploy_files import NGINX_SITE, env_example_values
from tests.deploy_tools import run, tool


def nginx_test(prefix: Path, config: Path) -> str:
    """`nginx -t` on `config`: what it printed, which must say the test is successful without a
    warning or an error."""
    result = run([tool("nginx"), "-t", "-p", prefix, "-e", prefix / "logs" / "error.log", "-c", config])
    output = result.stdout + result.stderr
    assert "test is successful" in output
    assert not re.search(r"\[(warn|emerg|alert|crit|error)\]", output), output
    return output


def test_nginx_accepts_the_site(tmp_path):
    """The site as written (port 80, upstream 127.0.0.1:5000), only its logs moved."""
    nginx_test(tmp_path, render(tmp_path))


def test_several_app_instances_are_one_upstream_each_health_checked(tmp_path):
    """N app hosts: one server line each, with the site's passive health check, and nginx accepts
    it; a request that fails on one instance is tried on the next, within bounds."""
    addresses = ["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"]
    nginx_test(tmp_path, render(tmp_path, upstream=addresses))
    site = (tmp_path / "site.conf").read_text()
    upstream = re.search(r"^upstream flaskapi \{(.*?)^\}", site, flags=re.M | re.S).group(1)
    servers = re.findall(r"^\s*server (\S+) max_fails=1 fail_timeout=5s;$", upstream, flags=re.M)
    assert servers == addresses
    assert "keepalive 32;" in upstream
    assert re.search(r"^\s*proxy_next_upstream error timeout;$", site, flags=re.M)  # never non_idempotent
    assert "non_idempotent" not in re.sub(r"#.*", "", site)
    assert re.search(r"^\s*proxy_next_upstream_tries 3;$", site, flags=re.M)
    assert re.search(r"^\s*proxy_next_upstream_timeout 10s;$", site, flags=re.M)
    assert '"upstream_addr":"$upstream_addr"' in site


def test_the_site_fits_in_debians_nginx_conf(tmp_path):
    """Included where Debian includes sites-enabled/ (inside its http {}, after its own
    directives), the site repeats none of them: `nginx -t` on Debian's nginx.conf itself."""
    debian = Path("/etc/nginx/nginx.conf")
    assert debian.exists(), "Debian's /etc/nginx/nginx.conf: apt-get install nginx"
    render(tmp_path)  # the site, its logs under tmp_path/logs
    text = debian.read_text()
    assert "include /etc/nginx/sites-enabled/*;" in text
    text = text.replace("include /etc/nginx/sites-enabled/*;", f"include {tmp_path / 'site.conf'};")
    text = text.replace("/var/log/nginx/", f"{tmp_path}/logs/")
    text = re.sub(r"^pid .*;$", f"pid {tmp_path}/nginx.pid;", text, flags=re.M)
    if os.geteuid() != 0:  # `user` makes sense only to a master started as root
        text = re.sub(r"^user .*;$", "", text, flags=re.M)
    (tmp_path / "debian.conf").write_text(text)
    nginx_test(tmp_path, tmp_path / "debian.conf")


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
    upstream_port = free_port()
    nginx = Nginx(tmp_path, upstream=f"127.0.0.1:{upstream_port}").start()
    upstream = None
    try:
        site = (tmp_path / "site.conf").read_text()
        assert (
            f"server 127.0.0.1:{upstream_port} max_fails=1 fail_timeout=5s;" in site
            and f"listen {nginx.listen} default_server;" in site
        )
        url = nginx.url

        # Upstream down: nginx's own 502, in the app's error shape, with a request id.
        response = requests.get(url + "/books/", timeout=10)
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

        # traceparent: started here when absent (trace id nginx's $request_id, no tracestate) ...
        seen = requests.get(url + "/", headers={"tracestate": "rojo=1"}, timeout=5).json()
        trace_id, span_id = seen["x-request-id"], seen["x-request-id"][:16]
        assert seen["traceparent"] == f"00-{trace_id}-{span_id}-00" and "tracestate" not in seen
        # ... a valid one passes with its tracestate; one with a zero id or a bad shape is replaced
        valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        seen = requests.get(url + "/", headers={"traceparent": valid, "tracestate": "rojo=1"}, timeout=5).json()
        assert seen["traceparent"] == valid and seen["tracestate"] == "rojo=1"
        for bad in (f"00-{'0' * 32}-00f067aa0ba902b7-01", valid.upper(), valid + "-x", "ff" + valid[2:]):
            seen = requests.get(url + "/", headers={"traceparent": bad, "tracestate": "rojo=1"}, timeout=5).json()
            assert seen["traceparent"] == f"00-{seen['x-request-id']}-{seen['x-request-id'][:16]}-00", bad
            assert "tracestate" not in seen

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
            "trace_id": response.json()["error"]["trace_id"],
        }
        assert re.fullmatch(r"[0-9a-f]{32}", response.json()["error"]["trace_id"])

        # nginx's access log has the same id (written just after the response: wait for it).
        def logged_413s():
            return [entry["request_id"] for entry in nginx.access_log() if entry["status"] == 413]

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
