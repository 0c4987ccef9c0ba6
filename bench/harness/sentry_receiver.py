"""A local stand-in for Sentry's ingestion endpoint that speaks its wire protocol.

sentry-sdk POSTs envelopes (newline-delimited JSON: an envelope header, then item headers and
payloads; gzip or brotli compressed) to /api/<project_id>/envelope/. We decode them exactly as
Sentry would, so the SDK runs unpatched end to end. `delay` makes it a slow Sentry: every
envelope is recorded on arrival, answered only `delay` seconds later.
"""

from __future__ import annotations

import gzip
import json
import threading
import time

import brotli

from bench.harness.http_receiver import LoopbackHTTPServer, QuietHandler


def parse_envelope(body: bytes) -> list[tuple[dict, bytes]]:
    """[(item header, payload)] of an envelope, honouring explicit item lengths."""
    header_end = body.index(b"\n") if b"\n" in body else len(body)
    rest = body[header_end + 1 :]
    items = []
    while rest.strip():
        line_end = rest.index(b"\n") if b"\n" in rest else len(rest)
        item_header = json.loads(rest[:line_end])
        rest = rest[line_end + 1 :]
        length = item_header.get("length")
        payload_end = (rest.index(b"\n") if b"\n" in rest else len(rest)) if length is None else length
        items.append((item_header, rest[:payload_end]))
        rest = rest[payload_end + 1 :]
    return items


class SentryReceiver(LoopbackHTTPServer):
    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.events: list[dict] = []
        self.raw: list[bytes] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802 (http.server's hook name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "br":
                    body = brotli.decompress(body)
                with receiver._lock:
                    receiver.raw.append(body)
                    for header, payload in parse_envelope(body):
                        if header.get("type") in ("event", "transaction"):
                            receiver.events.append(json.loads(payload))
                if receiver.delay:
                    time.sleep(receiver.delay)  # the slow Sentry this stands for
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"id": "0"}')
                except (BrokenPipeError, ConnectionResetError):  # the sender gave up (or died) waiting
                    pass

        super().__init__(Handler, block_on_close=not delay)  # stopping does not wait out slow answers
        self.dsn = f"http://publickey@127.0.0.1:{self.port}/1"

    def errors(self) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("type") != "transaction"]

    def transactions(self) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("type") == "transaction"]

    def wait_for(self, predicate, *, count: int = 1, timeout: float = 60.0, transactions: bool = False) -> list[dict]:
        """Error events (or transactions) matching `predicate`, once `count` have arrived (the
        deadline is generous: this returns as soon as they are there)."""
        deadline = time.monotonic() + timeout
        while True:
            matched = [e for e in (self.transactions() if transactions else self.errors()) if predicate(e)]
            if len(matched) >= count:
                return matched
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        seen = self.transactions() if transactions else self.errors()
        raise AssertionError(
            f"timed out after {timeout}s waiting for {count} matching Sentry "
            f"{'transactions' if transactions else 'events'}, got "
            f"{[e.get('transaction') or e.get('message') or e.get('logentry') for e in seen]}"
        )
