"""nginx in front of the service as deployed: the project's own site (deploy/nginx/flaskapi.conf)
rendered for a private run (`make run-edge`, the tests), and the process that serves it.

The renderer changes only what must differ from the server: the `listen` address, the upstream
servers (each gunicorn's BIND, one or several), the log paths, and optionally the value of a directive (a test's short
timeout). Everything nginx writes goes under one prefix directory, in a private nginx.conf that
includes the rendered site inside http {} as Debian's nginx.conf does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from bench.harness import polling
from bench.harness.environment import ROOT, free_port
from bench.harness.process import ManagedProcess

SITE = ROOT / "deploy" / "nginx" / "flaskapi.conf"
MISSING = "nginx is not installed: apt-get install nginx (Debian/Ubuntu)"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str | None:
    """$NGINX when set, else nginx on PATH or in the sbin directories (Debian installs it in
    /usr/sbin); None when there is none."""
    if os.environ.get("NGINX"):
        return shutil.which(os.environ["NGINX"])
    return shutil.which("nginx") or next(
        (str(path) for d in ("/usr/sbin", "/sbin", "/usr/local/sbin") if (path := Path(d) / "nginx").exists()), None
    )


def _replace(text: str, pattern: str, replacement: str, what: str) -> str:
    """`pattern` (a regex over whole lines) must match exactly once: a site that drifted from what
    the renderer expects fails loudly instead of rendering a config that silently differs."""
    rendered, count = re.subn(pattern, lambda _match: replacement, text, flags=re.M)
    if count != 1:
        raise ValueError(f"{SITE.name}: expected one {what}, found {count}")
    return rendered


# The upstream's one server line as written, its parameters (max_fails, fail_timeout) in group 1.
UPSTREAM_SERVER = r"^[ \t]*server 127\.0\.0\.1:5000((?: [^;]+)?);$"


def upstream_servers(text: str, upstream: str | Sequence[str]) -> str:
    """The server lines for `upstream` (one address or several), each with the parameters of the
    site's own line: every instance is health-checked the same way."""
    addresses = [upstream] if isinstance(upstream, str) else list(upstream)
    if not addresses:
        raise ValueError("an upstream needs at least one server")
    match = re.search(UPSTREAM_SERVER, text, flags=re.M)
    parameters = match.group(1) if match else ""
    return "\n".join(f"    server {address}{parameters};" for address in addresses)


def render_site(
    text: str,
    *,
    access_log: str | None = None,
    error_log: str | None = None,
    listen: str | None = None,
    upstream: str | Sequence[str] | None = None,
    overrides: dict[str, str] | None = None,
) -> str:
    """The site writing its access and error logs to the given files instead of /var/log/nginx/
    (None: as written), listening on `listen` (host:port, or a port) instead of port 80 (IPv4
    only), proxying to `upstream` (host:port, or a list of them: one `server` line each, with the
    site's health-check parameters) instead of 127.0.0.1:5000, and each directive of `overrides`
    ({"client_header_timeout": "2s"}) set to another value."""
    if access_log is not None:
        text = _replace(
            text,
            r"^[ \t]*access_log /var/log/nginx/flaskapi\.access\.log flaskapi_json;$",
            f"    access_log {access_log} flaskapi_json;",
            "access_log",
        )
    if error_log is not None:
        text = _replace(
            text,
            r"^[ \t]*error_log /var/log/nginx/flaskapi\.error\.log warn;$",
            f"    error_log {error_log} warn;",
            "error_log",
        )
    if listen is not None:
        text = _replace(text, r"^[ \t]*listen 80 default_server;$", f"    listen {listen} default_server;", "listen 80")
        text = _replace(text, r"^[ \t]*listen \[::\]:80 default_server;\n", "", "listen [::]:80")
    if upstream is not None:
        text = _replace(text, UPSTREAM_SERVER, upstream_servers(text, upstream), "upstream server")
    for directive, value in (overrides or {}).items():
        text = _replace(text, rf"^[ \t]*{re.escape(directive)} [^;]+;", f"    {directive} {value};", directive)
    return text


COMPOSE_SITE = ROOT / "deploy" / "compose" / "nginx.conf"
COMPOSE_HEADER = """\
# GENERATED from deploy/nginx/flaskapi.conf by `python -m bench.harness.nginx compose`; edit that
# file, then regenerate this one (tests/test_deploy_compose.py fails while they differ). The same
# site for docker compose: the upstream is the app service (app:5000), nginx listens on port 80
# of its container (IPv4: compose networks may have no IPv6), logs go to the container's output.
# `docker compose up -d --scale app=N`: nginx resolves `app` when it starts (or reloads) and puts
# every address the name has then in the upstream, each a server with the parameters below. It
# does not resolve it again (`server ... resolve` needs nginx 1.27.3; the image and Debian's
# package are older): after a scale or a recreated app container, `docker compose restart nginx`.

"""


def render_compose() -> str:
    """deploy/compose/nginx.conf as it must be: the site rendered for the compose stack."""
    return COMPOSE_HEADER + render_site(
        SITE.read_text(), access_log="/dev/stdout", error_log="/dev/stderr", listen="80", upstream="app:5000"
    )


def render(
    prefix: Path,
    *,
    listen: str | None = None,
    upstream: str | Sequence[str] | None = None,
    overrides: dict[str, str] | None = None,
    site: str | None = None,
) -> Path:
    """Write prefix/site.conf (render_site of `site`, by default the project's) and prefix/nginx.conf
    (pid, error log, access log and temporary files under `prefix`, the site included in http {});
    return the path of nginx.conf."""
    prefix = Path(prefix).resolve()
    log_dir = prefix / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for kind in TEMP_PATHS:
        (prefix / "temp" / kind).mkdir(parents=True, exist_ok=True)
    site_text = SITE.read_text() if site is None else site
    (prefix / "site.conf").write_text(
        render_site(
            site_text,
            access_log=str(log_dir / "flaskapi.access.log"),
            error_log=str(log_dir / "flaskapi.error.log"),
            listen=listen,
            upstream=upstream,
            overrides=overrides,
        )
    )
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix / 'temp' / kind};" for kind in TEMP_PATHS)
    # As root, nginx's workers would switch to nobody, who cannot write under `prefix`.
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = prefix / "nginx.conf"
    config.write_text(
        f"# Rendered by bench/harness/nginx.py from {SITE.relative_to(ROOT)}: a private nginx, all under {prefix}.\n"
        f"{user}"
        "worker_processes auto;\n"
        # Enough for the lesson's 1,000 locust users (one connection each, plus one upstream).
        "worker_rlimit_nofile 8192;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {log_dir / 'error.log'} warn;\n"
        "events {\n    worker_connections 4096;\n}\n"
        "http {\n"
        f"{temp_paths}\n"
        f"    access_log {log_dir / 'access.log'};\n"
        f"    include {prefix / 'site.conf'};\n"
        "}\n"
    )
    return config


class Nginx(ManagedProcess):
    """nginx in the foreground (`daemon off;`) on a config rendered under `prefix`, stopped as
    nginx is stopped gracefully: SIGQUIT to the master, which lets its workers finish.

    Ready when its port accepts connections (the upstream may be down on purpose: a 502 is an
    answer). `access_log()` reads its JSON access lines."""

    name = "nginx"
    stop_signal = signal.SIGQUIT
    stop_timeout = 10.0
    kill_mode = "mixed"
    ready_timeout = 30.0

    def __init__(
        self,
        prefix: Path,
        *,
        upstream: str | Sequence[str] | None,
        listen: str | None = None,
        overrides: dict[str, str] | None = None,
        site: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        self.prefix = Path(prefix).resolve()
        self.listen = listen or f"127.0.0.1:{free_port()}"
        self.host, _, port = self.listen.rpartition(":")
        self.port = int(port)
        self.url = f"http://{self.listen}"
        self.config = render(self.prefix, listen=self.listen, upstream=upstream, overrides=overrides, site=site)
        error_log = self.prefix / "logs" / "error.log"
        super().__init__(
            [binary, "-p", self.prefix, "-e", error_log, "-c", self.config, "-g", "daemon off;"],
            log_path=log_path or self.prefix / "nginx.out",
        )

    def start(self, timeout: float | None = None) -> Nginx:
        super().start()
        self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float | None = None) -> None:
        def listening() -> bool:
            if self.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.poll()}: {self.output()[-3000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=2).close()
                return True
            except OSError:
                return False

        try:
            polling.wait_for(
                listening, f"nginx to listen on {self.listen}", self.ready_timeout if timeout is None else timeout
            )
        except (RuntimeError, AssertionError):
            self.stop()
            raise

    def access_log(self) -> list[dict]:
        """The JSON lines of the site's access log so far (the flaskapi_json format)."""
        path = self.prefix / "logs" / "flaskapi.access.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["compose"]:
        sys.exit("usage: python -m bench.harness.nginx compose   (writes deploy/compose/nginx.conf)")
    COMPOSE_SITE.write_text(render_compose())
    print(f"wrote {COMPOSE_SITE.relative_to(ROOT)}")
