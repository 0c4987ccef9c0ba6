#!/usr/bin/python3
"""The log host's look at every line it receives, before rsyslog writes it: an mmexternal plugin
of deploy/rsyslog/central.conf.

rsyslog hands over each message as the frame the forwarder sent (deploy/rsyslog/forward.conf:
`<PRI>1 TIMESTAMP HOST flaskapi - - - LINE`), one per line on stdin, and reads one JSON answer
per line on stdout, which sets `$!central`:

- `line`: what the central files get. The app's JSON line with `"host": HOST` put first and the
  rest of the line byte for byte, so `grep '"request_id": "abc"'` and every jq recipe work on the
  log host as on the app host. A line that is not a JSON object becomes a JSON line that carries
  it as a string (`"event": "unparsed_line"`): every central line parses.
- `new` / `new_host`: "1" unless that line is among the last WINDOW lines of HOST already written
  to the combined file / to HOST's own file; rsyslog sends a line that is in both to
  duplicates.log instead.

Why the second part: shipping is at least once. A forwarder whose connection breaks sends again
every message it has no "200 OK" for, so a receiver killed after writing a line but before its
acknowledgement left gets that line twice (the first kill we tried did), and at each rotation
the forwarder reads the last second's lines twice (forward.conf says why). The plugin remembers
the recent lines of each host, starting from the tail of the central files, so a receiver
restarted after a crash knows what it wrote before it.
Two lines that are the same bytes from the same host count as one: the app's lines carry a
timestamp to the microsecond and the writing pid, and a request's lines its request id.

Standard library only (it runs under Debian's python3 on the log host, which has no venv), and
nothing may go to stderr: rsyslog reads stdout and stderr from one pipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

WINDOW = 20_000  # lines remembered per host and file: a RELP window is 128 messages
SEED_BYTES = 64 * 1024 * 1024  # read back at most this much of each central file at start
FRAME = re.compile(r"<\d{1,3}>1 \S+ (?P<host>\S+) \S+ \S+ \S+ - (?P<line>.*)", re.S)
HOST_PREFIX = '{"host": '
_DECODER = json.JSONDecoder()


class Recent:
    """The last `size` keys added, to ask whether a key is one of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._order: deque[bytes] = deque()
        self._keys: set[bytes] = set()

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def add(self, key: bytes) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.size:
            self._keys.discard(self._order.popleft())


def central_line(host: str, line: str) -> str:
    """`line` as the central files hold it: `host` first, then the line's own fields as they were
    written. A line that already has a `host` key keeps it as `line_host`; one that is not a JSON
    object is carried whole in `line` by a line of ours (`event: unparsed_line`)."""
    try:
        value = json.loads(line)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return json.dumps(
            {
                "host": host,
                "timestamp": datetime.now(timezone.utc).isoformat(),  # noqa: UP017 (3.11+ only)
                "level": "WARNING",
                "logger": "flaskapi.central",
                "event": "unparsed_line",
                "message": f"a line shipped from {host} is not a JSON object; kept as the string `line`",
                "line": line,
            }
        )
    prefix = HOST_PREFIX + json.dumps(host, ensure_ascii=False)
    if not value:
        return prefix + "}"
    if "host" in value:
        fields = {"line_host" if k == "host" else k: v for k, v in value.items()}
        return json.dumps({"host": host, **fields}, ensure_ascii=False)
    return prefix + ", " + line.lstrip()[1:].lstrip()


def key(line: str) -> bytes:
    return hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def host_of(line: str) -> str | None:
    """The host of a central line (its first field), None if it has none."""
    if not line.startswith(HOST_PREFIX):
        return None
    try:
        host, _ = _DECODER.raw_decode(line, len(HOST_PREFIX))
    except ValueError:
        return None
    return host if isinstance(host, str) else None


def tail_lines(path: Path, max_bytes: int) -> list[str]:
    """The whole lines among the last `max_bytes` of `path` ([] if it does not exist)."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            start = max(0, size - max_bytes)
            file.seek(start)
            data = file.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # began mid-line
    return [raw.decode("utf-8", "replace") for raw in lines[:-1]]  # the last one is "" or unfinished


def newest_backup(path: Path) -> Path | None:
    """The most recent uncompressed rotation of `path` (logrotate's delaycompress keeps one)."""
    backups = [p for p in path.parent.glob(path.name + ".*") if not p.name.endswith(".gz") and p.is_file()]
    return max(backups, key=lambda p: p.stat().st_mtime, default=None)


class Seen:
    """Per host, the recent lines of the combined file and of the host's own file."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.combined: dict[str, Recent] = {}
        self.own: dict[str, Recent] = {}

    def _recent(self, table: dict[str, Recent], host: str) -> Recent:
        recent = table.get(host)
        if recent is None:
            recent = table[host] = Recent(self.window)
        return recent

    def load(self, central_dir: Path, max_bytes: int = SEED_BYTES) -> None:
        """What the central files already end with: the newest backup, then the current file."""
        self._load(self.combined, central_dir / "app.log", max_bytes)
        for own in sorted((central_dir / "hosts").glob("*/app.log")):
            self._load(self.own, own, max_bytes)

    def _load(self, table: dict[str, Recent], path: Path, max_bytes: int) -> None:
        lines = tail_lines(path, max_bytes)
        backup = newest_backup(path)
        if backup is not None:
            left = max_bytes - sum(len(line) + 1 for line in lines)
            if left > 0:
                lines = tail_lines(backup, left) + lines
        for line in lines:
            host = host_of(line)
            if host is not None:
                self._recent(table, host).add(key(line))

    def judge(self, frame: str) -> dict:
        """The answer to rsyslog for one received frame."""
        match = FRAME.fullmatch(frame)
        host, line = (match["host"], match["line"]) if match else ("-", frame)
        text = central_line(host, line)
        digest = key(text)
        combined, own = self._recent(self.combined, host), self._recent(self.own, host)
        verdict = {"line": text, "new": "0" if digest in combined else "1", "new_host": "0" if digest in own else "1"}
        combined.add(digest)
        own.add(digest)
        return {"$!": {"central": verdict}}


def serve(seen: Seen, stdin, stdout) -> None:
    """Answer every frame on `stdin` (bytes, one per line) on `stdout`, in order, one line each. A
    line that cannot be judged gets `{}`: rsyslog then writes it as received, marked unchecked."""
    for raw in stdin:
        frame = raw.rstrip(b"\n").decode("utf-8", "replace")
        try:
            answer = json.dumps(seen.judge(frame), ensure_ascii=False)
        except Exception:  # one bad frame must not stop the log host
            answer = "{}"
        stdout.write(answer.encode("utf-8", "surrogatepass") + b"\n")
        stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--central-dir", type=Path, required=True, help="where app.log and hosts/ are")
    parser.add_argument("--window", type=int, default=WINDOW, help="lines remembered per host (default %(default)s)")
    args = parser.parse_args(argv)
    seen = Seen(args.window)
    seen.load(args.central_dir)
    serve(seen, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
