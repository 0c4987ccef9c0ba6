"""/docs in headless Chromium on a machine with no network but loopback. Run by
tests/test_docs_browser.py inside a network namespace of its own (`unshare --net`), as
`python -m tests.programs.docs_offline OUT_DIR` from the repo root: it brings the namespace's
loopback up, checks that nothing else is reachable, serves the app on 127.0.0.1, and lets
Chromium load /docs twice: once for a screenshot and a log of every URL it asked for, once for
the DOM Swagger UI built. Writes OUT_DIR/docs.png, net.json, dom.html and result.json.

TEST_DB_URI and TEST_TMP say where the database and the data are; CHROMIUM is the browser.
"""

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from werkzeug.serving import make_server

from service import create_app
from tests.conftest import base_config

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2: a new namespace's loopback starts down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def outside_reachable() -> str | None:
    """What answered outside loopback (None: nothing; the namespace has no other interface)."""
    for address in (("1.1.1.1", 443), ("8.8.8.8", 53)):
        try:
            socket.create_connection(address, timeout=2).close()
            return f"{address[0]}:{address[1]}"
        except OSError:
            pass
    return None


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    argv = [os.environ["CHROMIUM"], "--headless", "--disable-gpu", "--no-first-run"]
    argv += ["--disable-background-networking", "--window-size=1280,1400", "--virtual-time-budget=20000"]
    if os.geteuid() == 0:
        argv.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    return subprocess.run([*argv, *args, url], capture_output=True, text=True, timeout=120, check=False)


def main(out: Path) -> None:
    loopback_up()
    app = create_app(base_config(os.environ["TEST_DB_URI"], Path(os.environ["TEST_TMP"])))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/docs"
    try:
        shot = chromium(url, f"--screenshot={out / 'docs.png'}", f"--log-net-log={out / 'net.json'}")
        dom = chromium(url, "--dump-dom")
    finally:
        server.shutdown()
    (out / "dom.html").write_text(dom.stdout)
    result = {
        "outside_reachable": outside_reachable(),
        "origin": f"http://127.0.0.1:{server.server_port}",
        "screenshot_status": shot.returncode,
        "dom_status": dom.returncode,
        "stderr": (shot.stderr + dom.stderr)[-3000:],
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
