"""The edge: the project's nginx site (deploy/nginx/flaskapi.conf, rendered for loopback by
bench/harness/nginx.py) in front of the real gunicorn, against hostile clients.

Clients are told apart by their source address: all of 127.0.0.0/8 is loopback on Linux, so the
attacker binds 127.0.0.2 while the normal client stays on 127.0.0.1, and nginx's per-address
limits see two clients. Every socket is closed and every process stopped by the test itself.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from bench.harness.environment import ROOT, free_port, locust_command, locust_env, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.nginx import SITE, Nginx
from bench.harness.polling import wait_for
from bench.harness.process import ManagedProcess

pytestmark = pytest.mark.stack

NORMAL = "127.0.0.1"
ATTACKER = "127.0.0.2"
FLOODER = "127.0.0.3"
HOARDER = "127.0.0.4"
LESSON_LOCUSTFILE = ROOT / "bench" / "lesson_locustfile.py"  # the lesson's file, verbatim


def site_value(pattern: str) -> int:
    """A number from the shipped site, so the tests follow the file instead of repeating it."""
    return int(re.search(pattern, SITE.read_text(), flags=re.M).group(1))


HEADER_TIMEOUT = site_value(r"^\s*client_header_timeout (\d+)s;")
CONN_LIMIT = site_value(r"^\s*limit_conn flaskapi_conn (\d+);")
AUTH_RATE = site_value(r"zone=flaskapi_auth:\S+ rate=(\d+)r/s;")
AUTH_BURST = site_value(r"^\s*limit_req zone=flaskapi_auth burst=(\d+) nodelay;")


@pytest.fixture(scope="module")
def edge(migrated_database, tmp_path_factory):
    """gunicorn as deployed (3 gthread workers x 4 threads, production mode, real hashing cost)
    behind the shipped nginx site; the app trusts nginx's X-Forwarded-For, as in production."""
    workdir = tmp_path_factory.mktemp("edge")
    env = stack_env(migrated_database("test_edge"), workdir, TRUSTED_PROXIES="1")
    with (
        Gunicorn(env, workers=3, log_path=workdir / "gunicorn.out") as gunicorn,
        Nginx(workdir / "nginx", upstream=f"127.0.0.1:{gunicorn.port}") as nginx,
    ):
        yield SimpleNamespace(gunicorn=gunicorn, nginx=nginx, env=env, app_log=workdir / "logs" / "app.log")


# --- clients ----------------------------------------------------------------------------------


class Slowloris:
    """`count` connections from `source`, each sending the start of a request, then one more
    header line every `interval` seconds, never the blank line that ends the header. A
    connection the server closes is replaced, as the attack tool does, until stop(); then every
    socket is closed. `closed` has (seconds it lived, bytes the server sent) per server close."""

    REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\n"

    def __init__(self, host: str, port: int, *, count: int, source: str, interval: float) -> None:
        self.address, self.count, self.source, self.interval = (host, port), count, source, interval
        self.selector = selectors.DefaultSelector()
        self.open: dict[socket.socket, float] = {}  # socket -> when it connected
        self.received: dict[socket.socket, bytes] = {}
        self.closed: list[tuple[float, bytes]] = []
        self.opened = 0
        self.peak = 0
        self.lines_sent = 0
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    def start(self) -> Slowloris:
        self._thread.start()
        wait_for(self._all_open, f"{self.count} slow connections from {self.source}", timeout=60)
        return self

    def _all_open(self) -> bool:
        if self.error is not None:
            raise AssertionError(f"the attacker failed: {self.error!r}")
        return self.peak >= self.count

    def _connect(self) -> None:
        sock = socket.create_connection(self.address, timeout=10, source_address=(self.source, 0))
        sock.sendall(self.REQUEST)
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        self.open[sock] = time.monotonic()
        self.received[sock] = b""
        self.opened += 1

    def _readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:  # reset: nginx's reset_timedout_connection
            data = b""
        if data:  # an answer; its close comes next
            self.received[sock] += data
            return
        self.closed.append((time.monotonic() - self.open.pop(sock), self.received.pop(sock)))
        self.selector.unregister(sock)
        sock.close()

    def _run(self) -> None:
        try:
            next_line = time.monotonic() + self.interval
            while not self._stopping.is_set():
                while len(self.open) < self.count and not self._stopping.is_set():
                    self._connect()
                self.peak = max(self.peak, len(self.open))
                for key, _ in self.selector.select(timeout=0.05):
                    self._readable(key.fileobj)
                if time.monotonic() >= next_line:
                    for sock in list(self.open):
                        try:
                            sock.send(b"X-Slow: 1\r\n")
                            self.lines_sent += 1
                        except OSError:  # closed by the server: the selector reports it
                            pass
                    next_line += self.interval
        except BaseException as exc:
            self.error = exc
        finally:
            for sock in list(self.open):
                self.selector.unregister(sock)
                sock.close()
            self.open.clear()
            self.selector.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the attacker did not stop"
        assert not self.open, "a slow socket was left open"


def paced_gets(base_url: str, paths: list[str], *, seconds: float, pace: float) -> list[tuple[str, object, float]]:
    """The normal client: one GET every `pace` seconds for `seconds`, each on a new connection
    from 127.0.0.1: (path, status or the exception, seconds it took)."""
    results = []
    started = time.monotonic()
    next_at = started
    while time.monotonic() - started < seconds:
        path = paths[len(results) % len(paths)]
        began = time.monotonic()
        try:
            status: object = requests.get(base_url + path, timeout=10).status_code
        except requests.RequestException as exc:
            status = exc
        results.append((path, status, time.monotonic() - began))
        next_at += pace
        time.sleep(max(0.0, next_at - time.monotonic()))  # the client's pace, not a wait on a condition
    return results


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def exchange(nginx: Nginx, data: bytes, *, source: str = NORMAL, timeout: float = 30):
    """Send raw bytes on a new connection from `source`, read one response (status, headers, body)."""
    with socket.create_connection((nginx.host, nginx.port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.headers, response.read()


def nginx_error(status: int, headers, body: bytes, *, expected: int, code: str, request_id: str | None) -> dict:
    """The one JSON error shape, answered by nginx, with the request id in the header and the body:
    the client's when nginx had read it, else nginx's own (32 hex characters); and the trace id
    in the body and `traceresponse`, as the app answers."""
    assert status == expected, body
    assert headers["Content-Type"] == "application/json"
    assert b"<html" not in body.lower(), body
    error = json.loads(body)["error"]
    assert set(error) == {"status", "code", "message", "details", "request_id", "trace_id"}
    assert error["status"] == expected and error["code"] == code and error["details"] == {}
    assert headers["X-Request-ID"] == error["request_id"]
    if request_id is None:
        assert re.fullmatch(r"[0-9a-f]{32}", error["request_id"]), error
    else:
        assert error["request_id"] == request_id
    assert re.fullmatch(r"[0-9a-f]{32}", error["trace_id"]) and int(error["trace_id"], 16), error
    assert re.fullmatch(f"00-{error['trace_id']}-[0-9a-f]{{16}}-0[01]", headers["traceresponse"]), headers
    return error


def app_access_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if line.get("event") == "access"]


# --- slowloris: the hostile case first --------------------------------------------------------


def test_slowloris_through_the_edge_never_reaches_gunicorn(edge):
    """100 slow connections from 127.0.0.2 for 20 s: the normal client's every request is served,
    p99 under 1 s; nginx closes each slow connection after client_header_timeout, answering
    nothing (logged as 408), and not one of them reaches the app."""
    nginx = edge.nginx
    attack = Slowloris(nginx.host, nginx.port, count=100, source=ATTACKER, interval=2).start()
    try:
        served = paced_gets(nginx.url, ["/healthz", "/books/"], seconds=20, pace=0.1)
    finally:
        attack.stop()
    assert attack.error is None, repr(attack.error)

    latencies = [seconds for _, _, seconds in served]
    failed = [(path, status) for path, status, _ in served if status != 200]
    lived = [seconds for seconds, _ in attack.closed]
    print(
        f"\nslowloris through the edge: {len(served) - len(failed)} of {len(served)} normal requests served, "
        f"p50 {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms, p99 {p99(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms; {attack.opened} slow connections opened, {attack.peak} at once, "
        f"{len(attack.closed)} closed by nginx after {min(lived):.1f}-{max(lived):.1f} s "
        f"(client_header_timeout {HEADER_TIMEOUT}s), {attack.lines_sent} header lines trickled"
    )
    assert not failed, failed
    assert len(served) >= 20 and p99(latencies) < 1.0

    # Each of the first 100 was closed by nginx, none by us before the header timeout: the
    # header lines every 2 s did not stretch it, and nginx sent nothing (408 is only logged).
    assert attack.peak == 100 and len(attack.closed) >= 100
    for seconds, answer in attack.closed:
        assert HEADER_TIMEOUT - 0.5 <= seconds <= HEADER_TIMEOUT + 5, attack.closed
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer

    def logged_408s():
        return [e for e in nginx.access_log() if e["remote_addr"] == ATTACKER and e["status"] == 408]

    wait_for(lambda: len(logged_408s()) >= len(attack.closed), "nginx's 408 lines for the slow connections")
    assert all(e["upstream_status"] == "" for e in logged_408s())  # none was passed upstream
    # The app saw the normal client only (behind nginx its remote_addr is the client's).
    addresses = {line["remote_addr"] for line in app_access_lines(edge.app_log)}
    assert ATTACKER not in addresses and NORMAL in addresses


def test_slowloris_straight_at_gunicorn_starves_it(edge, tmp_path):
    """What the edge prevents, measured (not judged: how much it hurts depends on the machine):
    50 slow sockets straight at gunicorn for 15 s while /healthz is probed every second. Asserted
    only what is deterministic: the attack was real (gunicorn closed none of the sockets) and
    gunicorn serves again once they are gone."""
    env = {**edge.env, "LOG_DIR": str(tmp_path / "logs")}
    with Gunicorn(env, workers=3, log_path=tmp_path / "gunicorn.out") as gunicorn:
        attack = Slowloris("127.0.0.1", gunicorn.port, count=50, source=ATTACKER, interval=2)
        started = time.monotonic()
        attack.start()
        probes = []
        try:

            def probe():
                began = time.monotonic()
                try:
                    status: object = requests.get(gunicorn.url + "/healthz", timeout=5).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                return status, time.monotonic() - began

            # Probes at 1 s intervals, all done (answered or given up after 5 s) before the hold ends.
            with ThreadPoolExecutor(max_workers=9) as pool:
                futures = []
                for _ in range(9):
                    futures.append(pool.submit(probe))
                    time.sleep(1)  # the probes' pace
                probes = [future.result() for future in futures]
            time.sleep(max(0.0, 15 - (time.monotonic() - started)))  # the rest of the attack's 15 s
            assert attack.error is None, repr(attack.error)
            held = attack.peak == 50 and attack.closed == []
        finally:
            attack.stop()
        answered = [seconds for status, seconds in probes if status == 200]
        print(
            f"\nslowloris straight at gunicorn (3 workers x 4 threads): {len(answered)} of {len(probes)} "
            f"/healthz probes answered within 5 s while 50 slow sockets were held for 15 s "
            f"({attack.lines_sent} header lines trickled); probes: {probes}"
        )
        assert held, f"gunicorn closed slow sockets: {attack.closed}"
        # Once the attacker lets go, it serves again.
        wait_for(lambda: requests.get(gunicorn.url + "/healthz", timeout=5).status_code == 200, "gunicorn to recover")


# --- nginx's own errors, in the app's JSON shape ----------------------------------------------

BIG_URL = "/books/" + "a" * 5000
ERRORS = {
    # name: (request, status, code, request id in the answer: the client's, or None for nginx's)
    "400 lowercase method": (
        b"get /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: e-400\r\n\r\n",
        400,
        "bad_request",
        None,
    ),
    "400 malformed header": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: e-400b\r\nBad Header: x\r\n\r\n",
        400,
        "bad_request",
        "e-400b",
    ),
    "405 TRACE": (
        b"TRACE /books/ HTTP/1.1\r\nHost: x\r\nX-Request-ID: e-405\r\n\r\n",
        405,
        "method_not_allowed",
        "e-405",
    ),
    # Headers only: the client reads the 413 without sending the body.
    "413 body over 64k": (
        b"POST /books/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65537\r\n"
        b"X-Request-ID: e-413\r\n\r\n",
        413,
        "payload_too_large",
        "e-413",
    ),
    "414 5,000-character URL": (
        f"GET {BIG_URL} HTTP/1.1\r\nHost: x\r\nX-Request-ID: e-414\r\n\r\n".encode(),
        414,
        "uri_too_long",
        None,
    ),
    "431 9 KB header": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: e-431\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "header_too_large",
        "e-431",
    ),
    "400 (nginx's 501) unknown Transfer-Encoding": (
        b"POST /books/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nX-Request-ID: e-501\r\n\r\n",
        400,
        "bad_request",
        "e-501",
    ),
    "400 (nginx's 505) HTTP/3.0": (
        b"GET /healthz HTTP/3.0\r\nHost: x\r\nX-Request-ID: e-505\r\n\r\n",
        400,
        "bad_request",
        None,
    ),
    "404 an error page's own address": (
        b"GET /.flaskapi-error/502 HTTP/1.1\r\nHost: x\r\nX-Request-ID: e-404\r\n\r\n",
        404,
        "not_found",
        "e-404",
    ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_nginx_answers_its_own_errors_in_json(edge, name):
    request, status, code, request_id = ERRORS[name]
    nginx_error(*exchange(edge.nginx, request), expected=status, code=code, request_id=request_id)


# What a client sends that gunicorn's own parser refuses before the app: through the edge, nginx
# answers first, in JSON; straight at gunicorn, gunicorn answers, in JSON too (service/parse_errors.py).
PARSER_REFUSALS = ["431 9 KB header", "414 5,000-character URL", "400 lowercase method"]


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, object, bytes]]:
    """`count` responses read in order from one connection (status, headers, body)."""
    answers = []
    for _ in range(count):
        response = http.client.HTTPResponse(sock)
        response.begin()
        answers.append((response.status, response.headers, response.read()))
    return answers


@pytest.mark.parametrize("name", PARSER_REFUSALS)
def test_parser_refusals_on_a_reused_connection_are_json_too(edge, name):
    """After a first request served on a keep-alive connection (nginx then reads the next request
    into other buffers), the second is the one too large or malformed: the same JSON, then a close."""
    request, status, code, request_id = ERRORS[name]
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: reused-1\r\n\r\n"
    with socket.create_connection((edge.nginx.host, edge.nginx.port), timeout=30) as sock:
        sock.sendall(first)
        [(served, headers, _body)] = read_answers(sock, 1)
        assert served == 200 and headers["X-Request-ID"] == "reused-1"
        sock.sendall(request)
        [(refused, headers, body)] = read_answers(sock, 1)
        nginx_error(refused, headers, body, expected=status, code=code, request_id=request_id)
        assert headers["Connection"] == "close"
        assert sock.recv(1) == b""  # and nginx closed it


def gunicorn_error(status: int, headers, body: bytes, *, expected: int, code: str) -> dict:
    """The one JSON error shape, written by gunicorn itself for a request it could not parse
    (service/parse_errors.py): never its HTML page; a new request id; then it closes."""
    assert status == expected, body
    assert headers["Content-Type"] == "application/json" and b"<html" not in body.lower(), body
    error = json.loads(body)["error"]
    assert set(error) == {"status", "code", "message", "details", "request_id", "trace_id"}
    assert (error["status"], error["code"], error["details"]) == (expected, code, {}), error
    assert headers["X-Request-ID"] == error["request_id"] and re.fullmatch(r"[0-9a-f]{32}", error["request_id"])
    assert headers["Connection"] == "close"
    assert headers["X-Content-Type-Options"] == "nosniff"
    return error


@pytest.mark.parametrize("name", PARSER_REFUSALS)
def test_parser_refusals_straight_at_gunicorn_are_json_too(edge, name):
    """The direct path: gunicorn answers these itself, before any WSGI code runs, in the same
    JSON shape as everything else (its HTML page replaced, service/parse_errors.py)."""
    request, status, code, _ = ERRORS[name]
    with socket.create_connection(("127.0.0.1", edge.gunicorn.port), timeout=30) as sock:
        sock.sendall(request)
        [(answered, headers, body)] = read_answers(sock, 1)
    gunicorn_error(answered, headers, body, expected=status, code=code)


def many_headers(count: int) -> bytes:
    return b"".join(b"X-H%d: 1\r\n" % n for n in range(count))


# Requests nginx accepts and forwards, which gunicorn's parser then refuses itself: without
# parse_errors they reached clients through the edge as gunicorn's HTML page.
PASSED_THROUGH = {
    "raw non-ASCII in the request line": (b"GET /books/\xd9\xa1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "a control character in a header value": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-V: a\x01b\r\n\r\n",
        400,
        "bad_request",
    ),
    "Content-Type twice": (
        b"POST /books/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        400,
        "bad_request",
    ),
    "more header fields than gunicorn's limit (nginx adds its own)": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many_headers(98) + b"\r\n",
        431,
        "header_too_large",
    ),
}


@pytest.mark.parametrize("name", list(PASSED_THROUGH))
def test_what_nginx_passes_and_gunicorn_refuses_is_json_through_the_edge(edge, name):
    request, status, code = PASSED_THROUGH[name]
    answered, headers, body = exchange(edge.nginx, request)
    assert answered == status, body
    assert headers["Content-Type"] == "application/json" and b"<html" not in body.lower(), body
    error = json.loads(body)["error"]
    assert set(error) == {"status", "code", "message", "details", "request_id", "trace_id"}
    assert (error["status"], error["code"]) == (status, code), error


def test_the_largest_request_nginx_passes_is_answered_by_the_app_in_json(edge):
    """At the edge of large_client_header_buffers (4k): a request line or a header line of 4096
    bytes (CRLF included) reaches the app, which answers in JSON, never gunicorn's HTML; one
    byte more is nginx's 414 or 431. The app's own errors pass through untouched."""
    nginx = edge.nginx

    def get_line(length: int) -> bytes:
        prefix, suffix = b"GET /", b" HTTP/1.1\r\n"
        return prefix + b"a" * (length - len(prefix) - len(suffix)) + suffix

    assert len(get_line(4096)) == 4096
    status, headers, body = exchange(nginx, get_line(4096) + b"Host: x\r\nX-Request-ID: line-4096\r\n\r\n")
    assert status == 404 and headers["Content-Type"] == "application/json", body
    assert json.loads(body)["error"]["message"] == "No such resource"  # the app's 404
    assert headers["X-Request-ID"] == "line-4096"
    response = exchange(nginx, get_line(4097) + b"Host: x\r\n\r\n")
    nginx_error(*response, expected=414, code="uri_too_long", request_id=None)

    def header_line(length: int) -> bytes:
        prefix = b"X-Big: "
        return prefix + b"a" * (length - len(prefix) - 2) + b"\r\n"

    status, _, body = exchange(nginx, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header_line(4096) + b"\r\n")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    response = exchange(nginx, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header_line(4097) + b"\r\n")
    nginx_error(*response, expected=431, code="header_too_large", request_id=None)

    # The app's errors are the app's (error_page does not intercept upstream answers).
    response = requests.get(nginx.url + "/books/999999", headers={"X-Request-ID": "app-404"}, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["message"] == "No book with this id"
    response = requests.post(nginx.url + "/books/", data="x", headers={"X-Request-ID": "app-415"}, timeout=10)
    assert response.status_code == 415 and response.json()["error"]["request_id"] == "app-415"


def test_nginx_closes_slow_headers_and_bodies_without_an_answer(edge, tmp_path):
    """408 is what nginx logs, not what it sends: a header or a body too slow is closed (reset),
    so no client ever reads a 408 body. Short timeouts here (the shipped 10 s: the slowloris test)."""
    nginx = Nginx(
        tmp_path,
        upstream=f"127.0.0.1:{edge.gunicorn.port}",
        overrides={"client_header_timeout": "1s", "client_body_timeout": "1s"},
    ).start()
    try:
        for name, data in {
            "header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow-header\r\n",
            "body": b"POST /books/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n"
            b"X-Request-ID: slow-body\r\n\r\n{}",
        }.items():
            with socket.create_connection((nginx.host, nginx.port), timeout=30) as sock:
                began = time.monotonic()
                sock.sendall(data)
                try:
                    answer = sock.recv(65536)
                except ConnectionResetError:
                    answer = b""
                waited = time.monotonic() - began
            assert answer == b"", (name, answer)
            assert 0.9 <= waited < 20, (name, waited)

        def logged():
            return {e["request_id"]: e["status"] for e in nginx.access_log()}

        entries = wait_for(lambda: len(logged()) >= 2 and logged(), "two lines in nginx's access log")
        assert list(entries.values()) == [408, 408], entries
        assert "slow-body" in entries  # its header was complete: its id is on the line
        assert nginx.stop() == 0
    finally:
        nginx.stop()


def test_upstream_down_is_502_and_upstream_silent_is_504(tmp_path):
    """Not the shared stack: one nginx in front of a port nothing listens on, one in front of a
    socket that accepts connections (the kernel does) but never answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    down = Nginx(tmp_path / "down", upstream=f"127.0.0.1:{free_port()}").start()
    slow = Nginx(
        tmp_path / "slow",
        upstream=f"127.0.0.1:{silent.getsockname()[1]}",
        overrides={"proxy_read_timeout": "1s"},
    ).start()
    try:
        request = b"GET /books/ HTTP/1.1\r\nHost: x\r\nX-Request-ID: e-5xx\r\nConnection: close\r\n\r\n"
        status, headers, body = exchange(down, request)
        nginx_error(status, headers, body, expected=502, code="bad_gateway", request_id="e-5xx")
        assert headers["Retry-After"] == "2"
        nginx_error(*exchange(slow, request), expected=504, code="gateway_timeout", request_id="e-5xx")
    finally:
        down.stop()
        slow.stop()
        silent.close()


# --- per-address limits ------------------------------------------------------------------------


def test_an_auth_flood_from_one_address_gets_429_after_the_burst(edge):
    """8 clients on 127.0.0.3 each sending a login every 10 ms for 3 s (~800 a second): nginx
    passes the burst (60) plus 30 a second, answers the rest 429 with Retry-After, and other
    addresses are not limited."""
    nginx = edge.nginx
    results = []  # (request number, status, headers, body), in the order the answers came
    lock = threading.Lock()
    sent = iter(range(1_000_000))
    started = time.monotonic()
    deadline = started + 3

    def client() -> None:
        connection = http.client.HTTPConnection(nginx.host, nginx.port, timeout=30, source_address=(FLOODER, 0))
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(sent)
                body = b'{"email": "flood@example.com"}'  # invalid: the app answers 422 without hashing
                headers = {"Content-Type": "application/json", "X-Request-ID": f"flood-{i}"}
                connection.request("POST", "/auth/login", body=body, headers=headers)
                response = connection.getresponse()
                answer = (i, response.status, response.headers, response.read())
                with lock:
                    results.append(answer)
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
                time.sleep(0.01)  # the client's pace
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(client) for _ in range(8)]:
            future.result()
    elapsed = time.monotonic() - started

    statuses = [status for _, status, _, _ in results]
    passed = statuses.count(422)
    before_first_429 = statuses.index(429) if 429 in statuses else None
    allowed = AUTH_BURST + 1 + AUTH_RATE * elapsed
    print(
        f"\nauth flood from one address: {passed} of {len(results)} logins passed in {elapsed:.2f} s "
        f"(burst {AUTH_BURST} + {AUTH_RATE}/s allows {allowed:.0f}), {statuses.count(429)} got 429; "
        f"the first 429 was answer #{None if before_first_429 is None else before_first_429 + 1}"
    )
    assert set(statuses) == {422, 429}, statuses
    # nginx counts time with its own clock, read once per event loop: a few requests of slack.
    assert AUTH_BURST + 1 <= passed <= allowed + 10
    assert before_first_429 >= AUTH_BURST + 1 - 8  # at most 8 in flight: nearly the whole burst first
    for i, status, headers, body in results:
        if status == 429:
            error = nginx_error(status, headers, body, expected=429, code="too_many_requests", request_id=f"flood-{i}")
            assert headers["Retry-After"] == "1" and "/auth/" in error["message"]
        else:  # the app's own answer
            assert json.loads(body)["error"]["code"] == "validation_error"

    # Another address is not limited by it; the rest of the API is not limited by rate at all.
    response = requests.post(nginx.url + "/auth/login", json={"email": "x@example.com"}, timeout=10)
    assert response.status_code == 422
    assert {requests.get(nginx.url + "/healthz", timeout=10).status_code for _ in range(5)} == {200}


def test_limit_conn_caps_the_requests_one_address_holds_open(edge):
    """limit_conn counts requests in progress: limit + 5 POSTs from 127.0.0.4 whose bodies do not
    come yet. nginx holds `limit` of them itself (the body is read before gunicorn, with 12
    threads, is asked) and answers exactly 5 with 429; the normal client is served meanwhile;
    once the bodies come, the app answers every held one."""
    nginx = edge.nginx
    extra = 5
    headers = (
        "POST /books/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        "X-Request-ID: held-{i}\r\n\r\n"
    )
    sockets: dict[socket.socket, int] = {}
    selector = selectors.DefaultSelector()
    try:
        for i in range(CONN_LIMIT + extra):
            sock = socket.create_connection((nginx.host, nginx.port), timeout=30, source_address=(HOARDER, 0))
            sock.sendall(headers.format(i=i).encode())
            selector.register(sock, selectors.EVENT_READ)
            sockets[sock] = i

        def answered_ones():
            ready = [key.fileobj for key, _ in selector.select(timeout=0)]
            return ready if len(ready) >= extra else None

        # Well inside client_body_timeout (10 s), which would end the held ones.
        answered = wait_for(answered_ones, f"{extra} answers to the requests beyond the limit", timeout=8)
        assert len(answered) == extra
        for sock in answered:
            response = http.client.HTTPResponse(sock)
            response.begin()
            error = nginx_error(
                response.status,
                response.headers,
                response.read(),
                expected=429,
                code="too_many_requests",
                request_id=f"held-{sockets[sock]}",
            )
            assert "in progress" in error["message"] and response.headers["Retry-After"] == "1"
        assert requests.get(nginx.url + "/healthz", timeout=10).status_code == 200
        held = [sock for sock in sockets if sock not in answered]
        for sock in held:
            sock.sendall(b"{}")
        statuses = set()
        for sock in held:
            response = http.client.HTTPResponse(sock)
            response.begin()
            body = json.loads(response.read())
            statuses.add((response.status, body["error"]["code"]))
        assert statuses == {(401, "token_missing")}  # the app's answer: no token
        assert len(held) == CONN_LIMIT
    finally:
        selector.close()
        for sock in sockets:
            sock.close()


# --- the lesson's load test through the edge ---------------------------------------------------


def test_the_lessons_signups_pass_the_edge(edge, tmp_path):
    """The lesson's locustfile (bench/lesson_locustfile.py, verbatim), through nginx from ONE
    address: 100 users spawned at 10 a second, each registering and logging in once (~20 /auth/
    requests a second), then browsing: no failure, no 429. A rate or burst much lower than the site's fails here."""
    users = 100
    prefix = tmp_path / "run"
    stats_path = Path(f"{prefix}_stats.csv")
    args = locust_command(
        edge.nginx.url, users=users, rate=10, locustfile=LESSON_LOCUSTFILE, extra=("--csv", str(prefix))
    )
    env = locust_env(LOCUST_METRICS_BIND=f"127.0.0.1:{free_port()}")
    locust = ManagedProcess(args, env=env, log_path=tmp_path / "locust.out", name="locust")

    def stats() -> dict[tuple[str, str], dict]:
        try:
            with open(stats_path, newline="") as handle:
                return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}
        except (FileNotFoundError, KeyError):  # not written yet, or caught mid-write
            return {}

    def count(by_name, key) -> int:
        try:
            return int(by_name[key]["Request Count"])
        except (KeyError, ValueError):
            return 0

    def all_logged_in() -> bool:
        assert locust.poll() is None, f"locust exited {locust.poll()}: {locust.output()[-3000:]}"
        by_name = stats()
        return count(by_name, ("POST", "/auth/login")) >= users

    locust.start()
    try:
        wait_for(all_logged_in, f"{users} users registered and logged in through the edge", timeout=180, interval=0.5)
    finally:
        code = locust.stop(30)
    assert code == 0, locust.output()[-3000:]
    by_name = stats()
    assert int(by_name[("", "Aggregated")]["Failure Count"]) == 0, locust.output()[-3000:]
    assert count(by_name, ("POST", "/auth/register")) == users and count(by_name, ("POST", "/auth/login")) == users
    refused = [e for e in edge.nginx.access_log() if e["status"] == 429 and e["remote_addr"] == NORMAL]
    assert refused == []
    total = by_name[("", "Aggregated")]["Request Count"]
    print(f"\nthe lesson's sign-ups through the edge: {users} users, {total} requests, 0 failures, no 429")


# --- make run-edge -------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
def test_run_edge_serves_through_nginx_and_stops_both(edge, tmp_path, signum):
    """`make run-edge`'s launcher (python -m bench.edge): the API through nginx on EDGE_BIND, the
    site rendered under $DATA_DIR/edge; Ctrl-C or SIGTERM stops nginx and gunicorn, none left."""
    bind, edge_bind = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    (tmp_path / "metrics").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        **edge.env,
        "DATA_DIR": str(tmp_path / "data"),
        "LOG_DIR": str(tmp_path / "logs"),
        "BIND": bind,
        "EDGE_BIND": edge_bind,
        "METRICS_BIND": f"127.0.0.1:{free_port()}",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "WEB_CONCURRENCY": "1",
    }
    launcher = ManagedProcess(
        [sys.executable, "-m", "bench.edge"],
        env=env,
        log_path=tmp_path / "edge.out",
        name="bench.edge",
        ready_url=f"http://{edge_bind}/healthz",
        kill_mode="mixed",
    )
    launcher.stop_signal = signum
    pids: list[int] = []
    try:
        launcher.start()
        started = wait_for(
            lambda: re.search(r"nginx \(pid (\d+)\).*gunicorn \(pid (\d+)\)", launcher.output()),
            "the launcher's line with both pids",
        )
        pids = [int(started.group(1)), int(started.group(2))]
        response = requests.get(f"http://{edge_bind}/books/", headers={"X-Request-ID": "run-edge-1"}, timeout=10)
        assert response.status_code == 200 and response.headers["X-Request-ID"] == "run-edge-1"
        access = tmp_path / "data" / "edge" / "logs" / "flaskapi.access.log"
        wait_for(lambda: access.exists() and "run-edge-1" in access.read_text(), "the request in nginx's access log")
        assert f"server {bind} max_fails=1 fail_timeout=5s;" in (tmp_path / "data" / "edge" / "site.conf").read_text()

        assert launcher.stop(60) == 0, launcher.output()[-3000:]
        assert not [pid for pid in pids if alive(pid)], f"left running: {pids}\n{launcher.output()[-3000:]}"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(edge_bind.rpartition(":")[2])), timeout=2).close()
    finally:
        launcher.stop(60)
        for pid in pids:  # bounded even when the launcher misbehaved
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_run_edge_without_nginx_says_what_to_install(tmp_path):
    """`make run-edge` checks for nginx before anything else (no migration, no server): one line."""
    make = subprocess.run(
        ["make", "--no-print-directory", "-o", "install", "run-edge", f"BIN={Path(sys.executable).parent}"],
        cwd=ROOT,
        env={**os.environ, "NGINX": str(tmp_path / "no-nginx-here")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert make.returncode != 0
    ours = [line for line in (make.stdout + make.stderr).splitlines() if not line.startswith(("make: ", "make["))]
    assert ours == ["make run-edge needs nginx, which is not installed: apt-get install nginx (Debian/Ubuntu)"]


# --- trace context ----------------------------------------------------------------------------

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_the_edge_starts_a_trace_when_the_client_sent_none_and_passes_on_a_valid_one(edge):
    """One trace id on nginx's access line, the app's, the error body and `traceresponse`: the
    client's when valid, else one nginx started (its $request_id), never a zero one."""
    cases = {
        "edge-trace-none": ({}, None),
        "edge-trace-client": ({"traceparent": f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"}, CLIENT_TRACE),
        "edge-trace-zero": ({"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01", "tracestate": "a=1"}, None),
        "edge-trace-bad": ({"traceparent": "00-xyz", "tracestate": "a=1"}, None),
    }
    answers = {}
    for request_id, (headers, expected) in cases.items():
        response = requests.get(
            edge.nginx.url + "/books/999999", headers={"X-Request-ID": request_id, **headers}, timeout=10
        )
        assert response.status_code == 404
        trace_id = response.json()["error"]["trace_id"]
        assert response.headers["traceresponse"].startswith(f"00-{trace_id}-")
        assert trace_id == expected if expected else (re.fullmatch("[0-9a-f]{32}", trace_id) and int(trace_id, 16))
        answers[request_id] = trace_id
    assert len(set(answers.values())) == len(cases)

    def logged():
        edge_lines = {e["request_id"]: e for e in edge.nginx.access_log() if e["request_id"] in cases}
        app_lines = {e["request_id"]: e for e in app_access_lines(edge.app_log) if e["request_id"] in cases}
        return (edge_lines, app_lines) if len(edge_lines) == len(app_lines) == len(cases) else None

    edge_lines, app_lines = wait_for(logged, "the access lines of nginx and the app")
    for request_id, trace_id in answers.items():
        assert app_lines[request_id]["trace_id"] == trace_id
        assert edge_lines[request_id]["trace_id"] == trace_id, request_id  # nginx's trace is the app's


def test_nginx_own_answers_carry_the_callers_trace_in_traceresponse(edge):
    """A request nginx refuses itself (a body over the limit) is answered in the caller's trace:
    its trace id in the body and `traceresponse`, nginx's own span id there, the caller's sampled
    flag; without a traceparent, the trace nginx started."""
    parent = "00f067aa0ba902b7"
    for flags in ("01", "00"):
        response = requests.post(
            edge.nginx.url + "/books/",
            data=b"x" * 70_000,
            headers={"traceparent": f"00-{CLIENT_TRACE}-{parent}-{flags}"},
            timeout=10,
        )
        assert response.status_code == 413 and response.json()["error"]["trace_id"] == CLIENT_TRACE
        version, trace_id, span_id, echoed = response.headers["traceresponse"].split("-")
        assert (version, trace_id, echoed) == ("00", CLIENT_TRACE, flags)
        assert re.fullmatch("[0-9a-f]{16}", span_id) and span_id != parent  # nginx's span, not the caller's
    response = requests.post(edge.nginx.url + "/books/", data=b"x" * 70_000, timeout=10)
    trace_id = response.json()["error"]["trace_id"]
    assert response.headers["traceresponse"] == f"00-{trace_id}-{response.headers['X-Request-ID'][:16]}-00"
