"""Where Alertmanager's notifications land in tests and the demo: a local SMTP server (aiosmtpd)
and a local HTTP webhook receiver, each on a free loopback port and serving from a thread of its
own, recording every message with the time it arrived. No real mail server, no network.

    with SmtpReceiver() as smtp, WebhookReceiver() as hook:
        ...  # point Alertmanager at smtp.smarthost and hook.url (bench/harness/alertmanager.py)
        smtp.wait_for(lambda mail: "FlaskapiNotReady" in mail.subject, "the page by mail")
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage

from aiosmtpd.controller import Controller

from bench.harness.environment import free_port
from bench.harness.http_receiver import LoopbackHTTPServer, QuietHandler
from bench.harness.polling import wait_for


@dataclass(frozen=True)
class Mail:
    """One message as the SMTP server took it: envelope and parsed message."""

    received: float  # time.time() on arrival
    mail_from: str
    to: tuple[str, ...]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def text(self) -> str:
        """The plain-text body, decoded (Alertmanager sends it quoted-printable), with the wire's
        CRLF line ends as newlines."""
        return self._body("plain")

    @property
    def html(self) -> str:
        return self._body("html")

    def _body(self, subtype: str) -> str:
        part = self.message.get_body(preferencelist=(subtype,))
        return "" if part is None else part.get_content().replace("\r\n", "\n")


@dataclass(frozen=True)
class Post:
    """One webhook call: the path it was sent to and its JSON body."""

    received: float
    path: str
    body: dict

    @property
    def alerts(self) -> list[dict]:
        return self.body.get("alerts", [])


class _Recorder:
    """What both receivers share: the records, under a lock, and a wait for the ones wanted."""

    name = "receiver"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list = []

    def _record(self, record) -> None:
        with self._lock:
            self._records.append(record)

    def received(self, predicate=None) -> list:
        """Every record so far (those matching `predicate`), in arrival order."""
        with self._lock:
            return [r for r in self._records if predicate is None or predicate(r)]

    def wait_for(self, predicate, what: str, *, count: int = 1, timeout: float = 60) -> list:
        """The records matching `predicate`, once at least `count` have arrived."""

        def enough():
            matched = self.received(predicate)
            return matched if len(matched) >= count else None

        try:
            return wait_for(enough, f"{what} ({self.name})", timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; received: {[self.describe(r) for r in self.received()]}") from None

    def describe(self, record) -> str:
        return repr(record)


class SmtpReceiver(_Recorder):
    """An SMTP server that accepts every message (no TLS, no auth) and keeps it."""

    name = "smtp"

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                receiver._record(Mail(time.time(), envelope.mail_from, tuple(envelope.rcpt_tos), message))
                return "250 OK"

        self.port = free_port()
        self.smarthost = f"127.0.0.1:{self.port}"
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def describe(self, record: Mail) -> str:
        return f"{record.to}: {record.subject}"

    def __enter__(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()


class WebhookReceiver(_Recorder, LoopbackHTTPServer):
    """An HTTP server that answers every POST 200 and keeps its JSON body; `url` is its root (any
    path below it is accepted and recorded, so one receiver can stand for several webhooks)."""

    name = "webhook"

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802 (http.server's hook name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver._record(Post(time.time(), self.path, json.loads(body or b"{}")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        LoopbackHTTPServer.__init__(self, Handler)
        self.url = f"http://127.0.0.1:{self.port}"

    def describe(self, record: Post) -> str:
        return f"{record.path}: {record.body.get('status')} {[a['labels'].get('alertname') for a in record.alerts]}"
