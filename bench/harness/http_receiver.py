"""A local HTTP server standing for a remote one (Sentry, a webhook): a free loopback port,
served from a daemon thread for the duration of a `with`."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


class LoopbackHTTPServer:
    """`server`, `port` and a thread serving it; started on enter, shut down and closed on exit.
    `block_on_close=False`: stopping does not wait for requests still being answered."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], *, block_on_close: bool = True) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.block_on_close = block_on_close
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
