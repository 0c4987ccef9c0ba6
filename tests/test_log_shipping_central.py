"""The log host's side of log shipping (deploy/rsyslog/central.conf, central_lines.py,
logrotate-central), with real rsyslogd processes fed by lines this test appends to an app log
file the way the app appends them: logrotate's rotation of the central files, a receiver that
restarts after a crash knowing what it wrote, lines that are not JSON, TLS as documented; then
central_lines.py's rules one by one."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from bench.harness.polling import wait_for
from bench.harness.rsyslog import CENTRAL_CONF, CENTRAL_LINES, FORWARD_CONF, CentralReceiver, Forwarder
from bench.harness.rsyslog import shipping as shipping_to_the_log_host

_spec = importlib.util.spec_from_file_location("central_lines", CENTRAL_LINES)
central_lines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(central_lines)

HOST = "app-1"


def append(path: Path, *lines: str) -> None:
    """As the app writes: each line with its newline in one write(2) on an O_APPEND descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for line in lines:
            data = (line + "\n").encode()
            assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def lines_of(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends in a torn line"
    return text.split("\n")[:-1]


def record(message: str, **fields) -> str:
    return json.dumps({"timestamp": "2026-12-02T00:00:00+00:00", "level": "INFO", "message": message, **fields})


def wait_lines(path: Path, count: int, what: str) -> list[str]:
    wait_for(lambda: len(lines_of(path)) >= count, what, timeout=60, interval=0.1)
    return lines_of(path)


@pytest.fixture
def shipping(tmp_path):
    """A receiver and one forwarder following tmp/app/app.log; yields (app log, receiver)."""
    log = tmp_path / "app" / "app.log"
    log.parent.mkdir()
    with shipping_to_the_log_host({HOST: log}, tmp_path) as receiver:
        yield log, receiver


def test_logrotate_rotates_the_central_files_and_the_receiver_reopens_them(shipping, tmp_path):
    log, receiver = shipping
    before = [record(f"before {i}") for i in range(50)]
    append(log, *before)
    wait_lines(receiver.combined, 50, "the first 50 lines centrally")

    receiver.rotate(tmp_path / "logrotate")
    yesterday = time.strftime("%Y-%m-%d", time.localtime(time.time() - 86400))  # dateyesterday
    rotated = receiver.combined.with_name(f"app.log.{yesterday}")
    own_rotated = receiver.host_file(HOST).with_name(f"app.log.{yesterday}")
    assert [json.loads(line)["message"] for line in lines_of(rotated)] == [f"before {i}" for i in range(50)]
    assert len(lines_of(own_rotated)) == 50  # delaycompress: the newest backup stays plain

    after = [record(f"after {i}") for i in range(50)]
    append(log, *after)
    current = wait_lines(receiver.combined, 50, "50 lines in the new app.log (reopened on HUP)")
    assert [json.loads(line)["message"] for line in current] == [f"after {i}" for i in range(50)]
    assert len(wait_lines(receiver.host_file(HOST), 50, "50 lines in the host's new file")) == 50
    assert not receiver.duplicates.exists()


def test_a_receiver_restarted_after_a_crash_knows_the_lines_it_wrote(shipping):
    """The line check starts from the tail of the central files: a line that comes again after
    the restart (a RELP re-send; here the same bytes written again) goes to duplicates.log."""
    log, receiver = shipping
    first = record("once", request_id=uuid.uuid4().hex)
    append(log, first)
    wait_lines(receiver.combined, 1, "the line centrally")
    receiver.kill()
    receiver.start()
    append(log, first, record("next"))
    combined = wait_lines(receiver.combined, 2, "the next line centrally")
    assert [json.loads(line)["message"] for line in combined] == ["once", "next"]
    assert lines_of(receiver.duplicates) == [combined[0]]


def test_a_line_that_is_not_a_json_object_is_kept_as_a_string(shipping):
    log, receiver = shipping
    odd = ["plain text, not JSON", '{"level": "INFO", "message": "cut', "[1, 2]", '{"host": "spoofed", "message": "m"}']
    append(log, *odd)
    central = [json.loads(line) for line in wait_lines(receiver.combined, len(odd), "the odd lines centrally")]
    assert [c["line"] for c in central[:3]] == odd[:3]
    assert {c["event"] for c in central[:3]} == {"unparsed_line"} and {c["host"] for c in central} == {HOST}
    assert central[3] == {"host": HOST, "line_host": "spoofed", "message": "m"}


# --- TLS, as docs/logging.md and the configs' comments say -------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def certificates(directory: Path) -> None:
    """A CA, and the log host's and an app host's certificates signed by it (names in SAN)."""
    directory.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip
    for name, dns in (("loghost", "loghost.example.internal"), ("app", "app-1.example.internal")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={dns}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        (directory / f"{name}.ext").write_text(f"subjectAltName=DNS:{dns}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory)  # fmt: skip


def uncommented_tls_central(tls: Path) -> str:
    """central.conf with its commented TLS input instead of the plain one."""
    text = CENTRAL_CONF.read_text()
    plain_start = text.index('input(type="imrelp"')
    plain_end = text.index("\n", text.index('keepAlive="on")', plain_start)) + 1
    commented = text[text.index("#input(", plain_end) : text.index("])\n", plain_end) + 3]
    tls_input = "\n".join(line[1:] for line in commented.splitlines()) + "\n"
    text = text[:plain_start] + tls_input + text[plain_end:].replace(commented, "")
    return text.replace("/etc/flaskapi-loghost/tls", str(tls))


def uncommented_tls_forward(tls: Path) -> str:
    """forward.conf with the TLS lines its comment gives added to the action."""
    text = FORWARD_CONF.read_text()
    start = text.index("  # TLS (docs/logging.md)")
    comment = text[start : text.index("\n}", start)]
    tls_lines = [line.replace("  #", "  ", 1) for line in comment.splitlines()[1:]]
    text = text.replace(comment + "\n", "")
    last = 'action.resumeRetryCount="-1" action.resumeInterval="1" action.resumeIntervalMax="10"'
    assert text.count(last + ")") == 1
    text = text.replace(last + ")", last + "\n" + "\n".join(tls_lines) + ")")
    return text.replace("/etc/flaskapi/tls", str(tls))


def test_tls_as_documented_ships_and_refuses_a_peer_it_does_not_name(tmp_path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: apt-get install openssl", pytrace=False)
    tls = tmp_path / "tls"
    certificates(tls)
    central_conf, forward_conf = tmp_path / "central-tls.conf", tmp_path / "forward-tls.conf"
    central_conf.write_text(uncommented_tls_central(tls))
    forward_conf.write_text(uncommented_tls_forward(tls))
    assert 'tls="on"' in central_conf.read_text() and 'tls="on"' in forward_conf.read_text()

    log = tmp_path / "app" / "app.log"
    log.parent.mkdir()
    receiver = CentralReceiver(tmp_path / "central", config=central_conf)
    forwarder = Forwarder(log, target=receiver.target, hostname=HOST, workdir=tmp_path / "ship", config=forward_conf)
    with receiver, forwarder:
        append(log, record("over tls"))
        assert json.loads(wait_lines(receiver.combined, 1, "a line over TLS")[0])["message"] == "over tls"

    # The same forwarder, its certificate naming a host the receiver does not permit: refused.
    intruder = tmp_path / "intruder.conf"
    intruder.write_text(forward_conf.read_text().replace("app.pem", "loghost.pem").replace("app.key", "loghost.key"))
    other = tmp_path / "app2" / "app.log"
    other.parent.mkdir()
    receiver = CentralReceiver(tmp_path / "central2", config=central_conf)
    forwarder = Forwarder(other, target=receiver.target, hostname="app-2", workdir=tmp_path / "ship2", config=intruder)
    with receiver, forwarder:
        append(other, record("refused"))
        # rsyslog's own spelling: its report of a peer whose certificate names no permitted peer
        wait_for(lambda: "no permited name found" in receiver.output(), "the receiver to refuse the peer")
        assert not receiver.combined.exists()


# --- central_lines.py -----------------------------------------------------------------------


def frame(host: str, line: str) -> str:
    """What forward.conf sends: RFC 5424 with the line as MSG."""
    return f"<133>1 2026-12-02T00:00:00.000000+00:00 {host} flaskapi - - - {line}"


def test_a_json_line_gets_its_host_first_and_keeps_its_bytes():
    line = '{"level": "INFO", "message": "caf\u00e9 \\u2028", "status": 200, "duration_ms": 3.10}'
    out = central_lines.central_line("app-1", line)
    assert (
        out == '{"host": "app-1", "level": "INFO", "message": "caf\u00e9 \\u2028", "status": 200, "duration_ms": 3.10}'
    )
    assert central_lines.central_line("app-1", "{}") == '{"host": "app-1"}'
    assert json.loads(central_lines.central_line("app-1", '  { "a" : 1 }  ')) == {"host": "app-1", "a": 1}
    assert central_lines.host_of(out) == "app-1" and central_lines.host_of('{"level": "INFO"}') is None


def test_what_is_not_a_json_object_is_carried_as_a_string():
    for line in ("plain", '{"a": 1', "[1]", "3", "", '"text"', "\x1b[31mred"):
        out = json.loads(central_lines.central_line("h", line))
        assert out["line"] == line and out["event"] == "unparsed_line" and next(iter(out)) == "host"
    assert "\x1b" not in central_lines.central_line("h", "\x1b[31mred")  # escaped: safe on a terminal


def test_judge_tells_new_lines_from_copies_per_host_and_file():
    seen = central_lines.Seen(window=3)
    one = seen.judge(frame("app-1", '{"m": 1}'))["$!"]["central"]
    assert one == {"line": '{"host": "app-1", "m": 1}', "new": "1", "new_host": "1"}
    assert seen.judge(frame("app-1", '{"m": 1}'))["$!"]["central"]["new"] == "0"
    assert seen.judge(frame("app-2", '{"m": 1}'))["$!"]["central"]["new"] == "1"  # another host's line
    for m in (2, 3, 4):  # the window: the last 3 lines of a host
        seen.judge(frame("app-1", f'{{"m": {m}}}'))
    assert seen.judge(frame("app-1", '{"m": 1}'))["$!"]["central"]["new"] == "1"
    garbled = seen.judge("not a frame")["$!"]["central"]
    assert json.loads(garbled["line"])["host"] == "-"


def test_seen_starts_from_the_tail_of_the_central_files(tmp_path):
    (tmp_path / "hosts" / "app-1").mkdir(parents=True)
    old = '{"host": "app-1", "m": "old"}'
    kept = '{"host": "app-1", "m": "kept"}'
    (tmp_path / "app.log.2026-12-01").write_text(old + "\n")
    (tmp_path / "app.log").write_text(kept + "\n" + '{"host": "app-1", "m": "cut')  # unfinished last line
    (tmp_path / "hosts" / "app-1" / "app.log").write_text(old + "\n")
    seen = central_lines.Seen()
    seen.load(tmp_path)
    verdict = {m: seen.judge(frame("app-1", f'{{"m": "{m}"}}'))["$!"]["central"] for m in ("old", "kept", "cut")}
    assert (verdict["old"]["new"], verdict["old"]["new_host"]) == ("0", "0")
    assert (verdict["kept"]["new"], verdict["kept"]["new_host"]) == ("0", "1")
    assert (verdict["cut"]["new"], verdict["cut"]["new_host"]) == ("1", "1")


def test_serve_answers_one_line_per_frame_in_order():
    frames = [frame("app-1", '{"m": 1}'), frame("app-1", '{"m": 1}'), "x"]
    out = io.BytesIO()
    central_lines.serve(central_lines.Seen(), io.BytesIO("".join(f + "\n" for f in frames).encode()), out)
    answers = [json.loads(line) for line in out.getvalue().decode().splitlines()]
    assert [a["$!"]["central"]["new"] for a in answers] == ["1", "0", "1"]
