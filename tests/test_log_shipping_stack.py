"""Log shipping end to end (docs/logging.md, "Shipping off the host"): two app hosts (two real
gunicorn stacks, each its own log directory) with a forwarder each, one central receiver, all
real rsyslogd processes as deployed (bench/harness/rsyslog.py). Under a bounded load of tagged
requests spread over both, the receiver is killed (SIGKILL) for 10 s and restarted, and each
app's file rotates every 3 s. Afterwards the central files hold exactly what the app hosts wrote,
each line once with its host, every line valid JSON; lnav's format reads them."""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bench.harness.environment import ROOT
from bench.harness.gunicorn import serving
from bench.harness.polling import wait_for
from bench.harness.rsyslog import shipping as shipping_to_the_log_host

pytestmark = pytest.mark.stack

HOSTS = ("app-1", "app-2")
OUTAGE_SECONDS = 10.0
BEFORE, AFTER = 1200, 1200  # requests before the receiver is killed, and after its restart
PATHS = ["/healthz", "/books/", "/books/?limit=5", "/books/999999", "/nope"]
LONG_LINE_BYTES = 32_000  # four times rsyslog's default message size (8 KiB), which would cut it
LNAV_FORMAT = ROOT / "deploy" / "lnav" / "flaskapi_log.json"
README = ROOT / "README.md"


def app_lines(log_dir: Path) -> list[str]:
    """Every line the app wrote, rotated files included (each file ends with a whole line)."""
    lines = []
    for path in sorted(log_dir.glob("app.log*")):
        if path.name.endswith(".lock"):
            continue
        text = path.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n"), f"{path} ends in a torn line"
        lines += text.split("\n")[:-1]
    return lines


def central_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path} ends in a torn line"
    return text.split("\n")[:-1]


def host_prefix(host: str) -> str:
    return '{"host": ' + json.dumps(host) + ", "


def as_written(host: str, line: str) -> str:
    """A central line of `host` as the app host wrote it: the "host" field taken off again."""
    prefix = host_prefix(host)
    assert line.startswith(prefix), line[:200]
    return "{" + line[len(prefix) :]


@pytest.fixture(scope="module")
def shipping(migrated_database, tmp_path_factory):
    root = tmp_path_factory.mktemp("shipping")
    uri = migrated_database("test_log_shipping")
    completed: dict[str, list[str]] = {host: [] for host in HOSTS}
    lock = threading.Lock()
    figures: dict[str, object] = {}
    across = f"across-{uuid.uuid4().hex[:12]}"
    with contextlib.ExitStack() as started:  # stopped in reverse: apps, then forwarders and receiver
        logs = {host: root / host / "logs" / "app.log" for host in HOSTS}
        for log in logs.values():
            log.parent.mkdir(parents=True)
        receiver = started.enter_context(shipping_to_the_log_host(logs, root))
        first_receiver_pid = receiver.pid
        forwarders, stacks = receiver.forwarders, {}
        for host in HOSTS:
            stacks[host] = started.enter_context(
                serving(uri, root / host, workers=2, LOG_ROTATE_WHEN="S", LOG_ROTATE_INTERVAL="3", LOG_BACKUP_COUNT="0")
            )

        def one(i: int) -> None:
            host = HOSTS[i % len(HOSTS)]
            request_id = f"{host}-{i}-{uuid.uuid4().hex[:8]}"
            url = stacks[host].url + PATHS[i % len(PATHS)]
            response = requests.get(url, headers={"X-Request-ID": request_id}, timeout=30)
            assert response.headers["X-Request-ID"] == request_id
            with lock:
                completed[host].append(request_id)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, range(BEFORE)))
            sent = BEFORE

            # The outage: SIGKILL, and the load goes on for OUTAGE_SECONDS before the restart.
            receiver.kill()
            killed_at = time.monotonic()
            peak = dict.fromkeys(HOSTS, 0)
            while time.monotonic() - killed_at < OUTAGE_SECONDS:
                list(pool.map(one, range(sent, sent + 40)))
                sent += 40
                for host in HOSTS:
                    peak[host] = max(peak[host], forwarders[host].queue_bytes())
            receiver.start()
            figures["outage_seconds"] = time.monotonic() - killed_at
            figures["requests_during_outage"] = sent - BEFORE
            figures["queue_peak_bytes"] = peak

            # One request id on both hosts (a client that retried on the other one), and a line
            # far longer than rsyslog's default limit, appended whole as the app appends its lines.
            for host, path in zip(HOSTS, ["/books/", "/books/999999"], strict=True):
                response = requests.get(stacks[host].url + path, headers={"X-Request-ID": across}, timeout=30)
                assert response.headers["X-Request-ID"] == across
            long_line = json.dumps(
                {
                    "timestamp": "2026-12-02T00:00:00+00:00",
                    "level": "INFO",
                    "logger": "test",
                    "message": "x" * LONG_LINE_BYTES,
                }
            )
            fd = os.open(root / HOSTS[0] / "logs" / "app.log", os.O_WRONLY | os.O_APPEND)
            try:
                assert os.write(fd, (long_line + "\n").encode()) == len(long_line) + 1
            finally:
                os.close(fd)

            list(pool.map(one, range(sent, sent + AFTER)))
            sent += AFTER
        figures["requests"] = sent

        for stack in stacks.values():  # no more lines: what the apps wrote is final
            stack.stop()
        written = {host: app_lines(root / host / "logs") for host in HOSTS}

        def caught_up() -> bool:
            return all(len(central_lines(receiver.host_file(h))) >= len(written[h]) for h in HOSTS)

        try:
            wait_for(caught_up, "the central files to hold every line of both app hosts", timeout=120, interval=0.2)
        except AssertionError as exc:
            counts = {h: (len(central_lines(receiver.host_file(h))), len(written[h])) for h in HOSTS}
            outputs = "\n".join(f"{p.name}: {p.output()[-2000:]}" for p in (receiver, *forwarders.values()))
            raise AssertionError(f"{exc}: (central, written) lines {counts}\n{outputs}") from None
        figures["receiver_pids"] = (first_receiver_pid, receiver.pid)
        yield {
            "root": root,
            "receiver": receiver,
            "written": written,
            "completed": completed,
            "figures": figures,
            "across": across,
            "long_line": long_line,
            "combined": central_lines(receiver.combined),
            "own": {host: central_lines(receiver.host_file(host)) for host in HOSTS},
            "duplicates": central_lines(receiver.duplicates),
        }


def test_every_completed_request_is_in_the_central_stream_once_with_its_host(shipping):
    access = [json.loads(line) for line in shipping["combined"] if '"event": "access"' in line]
    ids = collections.Counter(a["request_id"] for a in access if a["request_id"].startswith(HOSTS))
    completed = [rid for host in HOSTS for rid in shipping["completed"][host]]
    assert len(completed) == shipping["figures"]["requests"] >= BEFORE + AFTER
    lost = set(completed) - set(ids)
    duplicated = {rid: n for rid, n in ids.items() if n > 1}
    assert not lost and not duplicated, f"{len(lost)} lost, {len(duplicated)} duplicated"
    assert sorted(ids) == sorted(completed)
    for line in access:
        if line["request_id"].startswith(HOSTS):
            assert line["request_id"].startswith(line["host"] + "-"), line
    figures = shipping["figures"]
    print(
        f"shipping: {figures['requests']} requests ({figures['requests_during_outage']} during the outage), "
        f"{len(shipping['combined'])} central lines, lost {len(lost)}, duplicated {len(duplicated)}, "
        f"{len(shipping['duplicates'])} resent lines set aside in duplicates.log; outage "
        f"{figures['outage_seconds']:.1f} s; forwarder queue on disk at its peak: "
        + ", ".join(f"{h} {b / 1024:.0f} KiB" for h, b in figures["queue_peak_bytes"].items())
    )


def test_every_central_line_is_json_with_its_host_first_and_none_is_torn(shipping):
    files = {"app.log": shipping["combined"], "duplicates.log": shipping["duplicates"]}
    files.update({f"hosts/{host}/app.log": lines for host, lines in shipping["own"].items()})
    for name, lines in files.items():
        for line in lines:
            value = json.loads(line)  # raises on a torn or merged line
            assert isinstance(value, dict) and next(iter(value)) == "host", (name, line[:200])
            assert value["host"] in HOSTS, (name, line[:200])
            assert value.get("event") not in ("unparsed_line", "unchecked_line"), (name, line[:200])


def test_central_files_hold_exactly_what_each_app_host_wrote(shipping):
    """Every line once, byte for byte after its host: nothing lost, doubled, cut or merged, across
    the app's rotations and the receiver's crash; each host's own file holds the combined stream's
    lines of that host (in the same order but where the receiver was killed between writing a line
    to one and to the other: the resent line goes to the second one later)."""
    for host in HOSTS:
        written = shipping["written"][host]
        own = shipping["own"][host]
        in_combined = [line for line in shipping["combined"] if line.startswith(host_prefix(host))]
        assert collections.Counter(own) == collections.Counter(in_combined)
        assert collections.Counter(as_written(host, line) for line in own) == collections.Counter(written)
    assert len(shipping["combined"]) == sum(len(lines) for lines in shipping["written"].values())
    long_lines = [line for line in shipping["own"][HOSTS[0]] if len(line) > LONG_LINE_BYTES]
    assert [as_written(HOSTS[0], line) for line in long_lines] == [shipping["long_line"]]
    for line in shipping["duplicates"]:  # what was set aside is a second copy, never a first
        assert line in shipping["combined"]


def test_the_outage_was_real_the_queue_went_to_disk_and_the_files_rotated(shipping):
    figures = shipping["figures"]
    first, second = figures["receiver_pids"]
    assert first != second
    assert figures["outage_seconds"] >= OUTAGE_SECONDS and figures["requests_during_outage"] > 0
    for host in HOSTS:
        assert figures["queue_peak_bytes"][host] > 0, f"{host}'s queue never reached the disk"
        backups = [p for p in (shipping["root"] / host / "logs").glob("app.log.*") if not p.name.endswith(".lock")]
        assert len(backups) >= 3, f"{host} rotated only {len(backups)} times"  # the outage alone spans three periods


def test_one_grep_follows_a_request_across_both_hosts(shipping):
    """The README's grep, as written, on the run's central files."""
    grep = next(line for line in README.read_text().splitlines() if line.startswith('grep -h \'"request_id": '))
    command = grep.replace("/var/log/flaskapi-central", str(shipping["receiver"].central_dir))
    command = command.replace("abc-123", shipping["across"])
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True)
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((host, message.split()[2]) for host, _, message in found) == [("app-1", "200"), ("app-2", "404")]


# --- lnav ------------------------------------------------------------------------------------


def readme_lnav(comment: str) -> str:
    """The lnav command under `# lnav: <comment>` in the README."""
    match = re.search(r"^# lnav: " + re.escape(comment) + r"\n(lnav .*)$", README.read_text(), re.MULTILINE)
    assert match, f"no '# lnav: {comment}' command in the README"
    return match.group(1)


def lnav_lines(shipping) -> list[str]:
    """The combined stream without the test's long line (see the lnav fixture)."""
    return [line for line in shipping["combined"] if len(line) < LONG_LINE_BYTES]


@pytest.fixture(scope="module")
def lnav(shipping, tmp_path_factory):
    """Run a README lnav command on the run's central files, its result as CSV rows (lnav's
    `:write-csv-to -` appended; lnav says "no query result" for zero rows), with the format
    installed as the README says (`lnav -i`)."""
    binary = shutil.which("lnav")
    if binary is None:
        pytest.fail("lnav is not installed: apt-get install lnav (.ci/system-deps.sh does)", pytrace=False)
    home = tmp_path_factory.mktemp("lnav-home")
    env = {**os.environ, "HOME": str(home), "TERM": "dumb"}
    installed = subprocess.run(
        [binary, "-i", LNAV_FORMAT], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert installed.returncode == 0 and (home / ".lnav/formats/installed" / LNAV_FORMAT.name).exists(), installed
    # lnav 0.11 slows down on every line that follows a very long one (the 32 KB line made one of
    # these queries take 25 s instead of 0.1 s): it reads a copy without that line.
    central = tmp_path_factory.mktemp("lnav-central")
    (central / "app.log").write_text("".join(line + "\n" for line in lnav_lines(shipping)))
    central = str(central)

    def query(command: str) -> list[dict[str, str]]:
        command = command.replace("/var/log/flaskapi-central", central).replace("abc-123", shipping["across"])
        result = subprocess.run(
            ["bash", "-c", command + " -c ':write-csv-to -'"],
            stdin=subprocess.DEVNULL,  # lnav reads a stdin that is not a terminal as one more log
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        if result.stderr.startswith("✘ error: no query result to write"):  # the query matched no line
            return []
        assert "error" not in result.stderr.lower(), result.stdout + result.stderr
        return list(csv.DictReader(result.stdout.splitlines()))

    return query


def test_lnav_reads_every_central_line_with_its_fields(shipping, lnav):
    combined = [json.loads(line) for line in lnav_lines(shipping)]
    every_line = (
        'lnav -n -c ";SELECT host, count(*) AS n FROM flaskapi_log GROUP BY host" /var/log/flaskapi-central/app.log'
    )
    hosts = collections.Counter(line["host"] for line in combined)
    assert {row["host"]: int(row["n"]) for row in lnav(every_line)} == hosts

    rows = lnav(readme_lnav("one request across hosts"))
    across = [line for line in combined if line.get("request_id") == shipping["across"]]
    expected = sorted(across, key=lambda line: line["timestamp"])
    assert [(row["written"], row["host"], row["log_body"]) for row in rows] == [
        (line["timestamp"], line["host"], line["message"]) for line in expected
    ]
    assert {row["host"] for row in rows} == set(HOSTS)


def test_lnav_errors_by_route_and_host(shipping, lnav):
    access = [json.loads(line) for line in lnav_lines(shipping) if '"event": "access"' in line]
    command = readme_lnav("5xx by route and host")
    for threshold in (500, 400):  # as written, and for the 4xx the run has plenty of
        # A path no route matched (/nope) has route null: lnav writes <NULL>.
        expected = collections.Counter((a["route"] or "<NULL>", a["host"]) for a in access if a["status"] >= threshold)
        rows = lnav(command.replace(">= 500", f">= {threshold}"))
        assert {(row["route"], row["host"]): int(row["requests"]) for row in rows} == expected
    assert expected, "the run has 404s"


def test_lnav_slowest_requests(shipping, lnav):
    access = [json.loads(line) for line in lnav_lines(shipping) if '"event": "access"' in line]
    rows = lnav(readme_lnav("the 10 slowest requests"))
    durations = sorted((a["duration_ms"] for a in access), reverse=True)[:10]
    assert [float(row["duration_ms"]) for row in rows] == durations
    seen = {(a["request_id"], a["host"], a["duration_ms"]) for a in access}
    for row in rows:
        assert (row["request_id"], row["host"], float(row["duration_ms"])) in seen, row
