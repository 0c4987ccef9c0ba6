"""The JSON log format and request ids, in-process (the multi-process tests are in
test_logging_stack.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import unicodedata

import pytest

from bench.harness.polling import wait_for
from logging_conf.formatter import JsonFormatter
from service.observability.metrics import UNHANDLED

REQUIRED = {"timestamp", "level", "logger", "message", "pid"}


def _record(msg, *args, exc_info=None, **extra):
    record = logging.LogRecord("test.logger", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_multiline_message_is_one_valid_json_line():
    line = JsonFormatter().format(_record('first\nsecond\n"quoted"\ttab'))
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == 'first\\nsecond\\n"quoted"\\ttab'  # shown escaped, not as line breaks
    assert data.keys() >= REQUIRED
    assert data["level"] == "WARNING" and data["logger"] == "test.logger"
    assert data["timestamp"].endswith("+00:00")  # ISO-8601, UTC


@pytest.mark.parametrize(
    "msg, args, extra",
    [
        ("GET %s %d", ("/books/", 200), {"event": "access", "status": 200, "duration_ms": 3.125, "user_id": None}),
        ("nested", (), {"rows": [1, {"k": "v"}], "color_message": "dropped", "_private": 1, "when": object()}),
        ("unsafe \x07 \u202e", (), {"path": "/a\\b\x1b[31m", "token": "Bearer abc.def"}),
    ],
)
def test_the_plain_path_writes_what_python_json_logger_writes(msg, args, extra):
    """The formatter's own path for a record without exception or stack (every line but an
    error's) is a speed-up only: the same line, byte for byte, as python-json-logger's format."""
    from logging_conf.formatter import _JsonFormatter
    from logging_conf.redaction import redact

    formatter = JsonFormatter()
    fast, slow = (logging.LogRecord("service.access", logging.INFO, __file__, 1, msg, args, None) for _ in "ab")
    for record in (fast, slow):
        record.__dict__.update(extra)
    slow.created = fast.created
    assert formatter._plain
    assert formatter.format(fast) == redact(_JsonFormatter.format(formatter, slow))


def test_the_timestamp_is_datetimes_isoformat_to_the_microsecond():
    import random
    from datetime import UTC, datetime

    from logging_conf.formatter import _utc_isoformat

    rng = random.Random(18)
    moments = [rng.uniform(1e9, 2e9) for _ in range(20_000)]
    moments += [1e9 + k / 1e6 + 0.5e-6 for k in range(2_000)]  # halfway microseconds: rounded to even
    moments += [1_700_000_000.0, 1_700_000_000.9999995, 1_699_999_999.9999996]  # no microseconds; a carry
    for moment in moments:
        assert _utc_isoformat(moment) == datetime.fromtimestamp(moment, tz=UTC).isoformat(), moment


def test_exceptions_are_structured():
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        line = JsonFormatter().format(_record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line
    exc = json.loads(line)["exc_info"]
    assert exc["type"] == "ValueError"
    assert exc["message"] == "bad value\\nsecond line"
    assert exc["frames"][-1]["function"] == "test_exceptions_are_structured"
    assert "Traceback" in exc["traceback"]


# What a reader's terminal or `jq -r` must never be handed raw: C0 and C1 controls, DEL, the
# line and paragraph separators, and the bidirectional controls (Trojan Source).
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
HOSTILE = "x\nINJECTED\r\x1b[31m\x07\x00\t\x7f\x85\x9b\u2028\u2029\u202e\u2066\u200f"
HOSTILE_SHOWN = r"x\nINJECTED\r\x1b[31m\x07\x00\t\x7f\x85\x9b\u2028\u2029\u202e\u2066\u200f"


def unsafe_characters(value) -> list[str]:
    """Every unsafe character in the strings (keys too) of parsed JSON."""
    if isinstance(value, dict):
        return [c for k, v in value.items() for c in unsafe_characters(k) + unsafe_characters(v)]
    if isinstance(value, list):
        return [c for v in value for c in unsafe_characters(v)]
    if isinstance(value, str):
        return [c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI]
    return []


def test_control_characters_are_shown_escaped_in_every_field():
    class Opaque:
        def __str__(self) -> str:
            return "opaque" + HOSTILE

    try:
        raise ValueError("bad" + HOSTILE)
    except ValueError:
        exc_info = sys.exc_info()
    record = _record(
        "GET %s 404",
        "/books/" + HOSTILE,
        exc_info=exc_info,
        path="/books/" + HOSTILE,
        details={"user_agent": HOSTILE, HOSTILE: [HOSTILE, 1, None]},
        thing=Opaque(),
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    data = json.loads(line)
    assert unsafe_characters(data) == []
    assert data["message"] == f"GET /books/{HOSTILE_SHOWN} 404"
    assert data["path"] == "/books/" + HOSTILE_SHOWN
    assert data["details"] == {"user_agent": HOSTILE_SHOWN, HOSTILE_SHOWN: [HOSTILE_SHOWN, 1, None]}
    assert data["thing"] == "opaque" + HOSTILE_SHOWN
    assert data["exc_info"]["message"] == "bad" + HOSTILE_SHOWN
    assert "Traceback" in data["exc_info"]["traceback"]
    # what is not a control character is left alone: text, quotes, backslashes, emoji with joiners
    plain = 'Dune \u00e9t\u00e9 "quoted" back\\slash \U0001f469\u200d\U0001f4bb'
    assert json.loads(JsonFormatter().format(_record(plain)))["message"] == plain


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abc.def.ghi",
        'login {"password": "hunter2-secret"}',
        "token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl",
        "password=hunter2-secret&x=1",
    ],
)
def test_credentials_are_redacted_from_any_line(text):
    line = JsonFormatter().format(_record(text))
    for secret in ("abc.def.ghi", "hunter2-secret", "eyJhbGciOiJIUzI1NiJ9"):
        assert secret not in line
    assert "[REDACTED" in line


def test_request_id_is_echoed_and_generated_when_absent_or_insane(client):
    assert client.get("/healthz", headers={"X-Request-ID": "req-42.a:b"}).headers["X-Request-ID"] == "req-42.a:b"
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    for insane in ("x" * 129, "has space", "semi;colon", "new\\nline", "ünïcode"):
        echoed = client.get("/healthz", headers={"X-Request-ID": insane}).headers["X-Request-ID"]
        assert echoed != insane and len(echoed) == 32


def test_error_bodies_carry_the_request_id(client):
    response = client.get("/books/0", headers={"X-Request-ID": "trace-me"})
    assert response.status_code == 404
    assert response.get_json()["error"]["request_id"] == "trace-me"


def test_an_error_in_a_request_logs_its_stack_with_the_request_id(make_app, tmp_path):
    app = make_app(LOG_DIR=str(tmp_path / "logs"), LOG_CONSOLE="0")

    @app.get("/boom")
    def boom():
        raise RuntimeError("exploded inside the view")

    def unhandled_count() -> float:
        return sum(
            sample.value
            for family in UNHANDLED.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    before = unhandled_count()
    response = app.test_client().get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert unhandled_count() - before == 1
    assert "exploded" not in response.get_data(as_text=True)  # no internals to the client
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = [json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines()]
    errors = [line for line in lines if line.get("event") == "unhandled_exception"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "boom-1"
    assert errors[0]["level"] == "ERROR"
    assert errors[0]["exc_info"]["type"] == "RuntimeError"
    assert any(frame["function"] == "boom" for frame in errors[0]["exc_info"]["frames"])
    access = [line for line in lines if line.get("event") == "access"]
    assert [(a["request_id"], a["status"], a["route"], a["level"]) for a in access] == [
        ("boom-1", 500, "/boom", "ERROR")
    ]


class FakeClock:
    """Epoch seconds that move only when the test moves them: which period a record falls in
    never depends on how fast (or how loaded) the machine is."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rotated_files_are_gzipped_one_rotation_later_when_asked(tmp_path):
    """Compressed one rotation late (delaycompress): a process that has not yet noticed the
    rotation may still append to the newest backup, so only older ones are compressed."""
    import gzip

    import logging_conf
    from logging_conf.rotation import SharedTimedRotatingFileHandler

    options = dict(logging_conf.build(log_dir=tmp_path, when="S", interval=1, gzip=True)["handlers"]["file"])
    assert options.pop("class") == logging_conf.ROTATING_HANDLER
    options.pop("formatter")
    clock = FakeClock()
    handler = SharedTimedRotatingFileHandler(**options, clock=clock)
    handler.setFormatter(JsonFormatter())
    try:
        for message in ("first period", "second period", "third period"):
            handler.emit(_record(message))
            clock.now += 1  # the next record belongs to the next period
        # the compression runs on a background thread
        wait_for(lambda: list(tmp_path.glob("app.log.*.gz")), "the oldest backup to be gzipped")
    finally:
        handler.close()
    [compressed] = tmp_path.glob("app.log.*.gz")
    assert json.loads(gzip.decompress(compressed.read_bytes()))["message"] == "first period"
    [plain] = [p for p in tmp_path.glob("app.log.*") if p.suffix not in (".gz", ".lock")]
    assert json.loads(plain.read_text())["message"] == "second period"
    assert json.loads((tmp_path / "app.log").read_text())["message"] == "third period"


def test_backups_beyond_the_count_are_deleted_and_none_is_overwritten(tmp_path):
    from logging_conf.rotation import SharedTimedRotatingFileHandler

    clock = FakeClock()
    handler = SharedTimedRotatingFileHandler(
        str(tmp_path / "app.log"), when="S", interval=1, backupCount=2, clock=clock
    )
    handler.setFormatter(JsonFormatter())
    try:
        for n in range(5):
            handler.emit(_record(f"line {n}"))
            clock.now += 1  # due at the next line; each period a second later
    finally:
        handler.close()
    backups = sorted(p for p in tmp_path.glob("app.log.*") if p.suffix != ".lock")
    assert len(backups) == 2
    kept = [json.loads(p.read_text())["message"] for p in backups] + [
        json.loads(line)["message"] for line in (tmp_path / "app.log").read_text().splitlines()
    ]
    assert kept == ["line 2", "line 3", "line 4"]


def test_a_backup_name_that_is_taken_gets_a_counter_instead_of_being_overwritten(tmp_path):
    from logging_conf.rotation import SharedTimedRotatingFileHandler

    clock = FakeClock()  # never moves: no rotation is due but the ones the test forces
    handler = SharedTimedRotatingFileHandler(str(tmp_path / "app.log"), when="S", interval=1, clock=clock)
    handler.setFormatter(JsonFormatter())
    try:
        for n in range(3):
            handler.emit(_record(f"line {n}"))
            handler.rolloverAt = clock.now  # due now, and for the same period every time
    finally:
        handler.close()
    backups = sorted(p.name for p in tmp_path.glob("app.log.*") if p.suffix != ".lock")
    stamp = backups[0].removeprefix("app.log.")
    assert backups == [f"app.log.{stamp}", f"app.log.{stamp}.1"]
    assert json.loads((tmp_path / backups[0]).read_text())["message"] == "line 0"


def test_threads_log_without_a_lock_across_rotations_and_no_line_is_lost_or_torn(tmp_path):
    """gthread workers log from several threads; the handler takes no lock to write, and a
    thread still holding the stream a rotation retired writes into the rotated file."""
    import itertools
    import threading

    from logging_conf.rotation import SharedTimedRotatingFileHandler

    threads, per_thread = 8, 3000
    # The clock advances one period every 4,000 reads (at least one read per record): about six
    # rotations while the threads write, however fast or slow they run.
    reads = itertools.count()
    handler = SharedTimedRotatingFileHandler(
        str(tmp_path / "app.log"), when="S", interval=1, clock=lambda: 1_000_000 + next(reads) // 4000
    )
    handler.setFormatter(JsonFormatter())

    def writer(n: int) -> None:
        for i in range(per_thread):
            handler.handle(_record("line", writer=n, seq=i, pad="x" * (i % 300)))

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not any(worker.is_alive() for worker in workers), "a writer thread is stuck"
    handler.close()
    files = [p for p in tmp_path.iterdir() if p.name.startswith("app.log") and p.suffix != ".lock"]
    assert len(files) >= 3, files  # it did rotate, at least twice, while the threads were writing
    seen = [(line["writer"], line["seq"]) for p in files for line in map(json.loads, p.read_text().splitlines())]
    assert sorted(seen) == [(n, i) for n in range(threads) for i in range(per_thread)]


# --- write errors: counted, reported once a minute ------------------------------------------


def write_errors(handler: str) -> float:
    from logging_conf.write_errors import WRITE_ERRORS

    return sum(
        sample.value
        for family in WRITE_ERRORS.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("handler") == handler
    )


def test_a_broken_stderr_is_counted_without_a_traceback_per_line(capsys):
    """The console handler under a broken pipe (journald or the terminal gone): counted, one
    report attempt a minute, where the stdlib wrote a traceback per record."""
    import os

    import logging_conf
    from logging_conf.write_errors import ConsoleHandler

    assert logging_conf.build()["handlers"]["console"]["class"] == "logging_conf.write_errors.ConsoleHandler"
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w")
    handler = ConsoleHandler(stream)
    handler.setFormatter(JsonFormatter())
    try:
        before = write_errors("console")
        for n in range(500):
            handler.handle(_record(f"line {n}"))
        assert write_errors("console") - before == 500
        err = capsys.readouterr().err  # the report goes to sys.stderr, here not the broken pipe
        assert "Traceback" not in err and "Logging error" not in err
        [report] = [json.loads(line) for line in err.splitlines()]
        assert report["handler"] == "console" and "BrokenPipeError" in report["error"]
    finally:
        handler.close()
        with contextlib.suppress(BrokenPipeError):
            stream.close()


def test_counting_never_fails_whatever_the_multiprocess_dir(tmp_path):
    """PROMETHEUS_MULTIPROC_DIR unset, set, or naming a directory that is gone: the handlers
    load and a lost record is counted (or, with the directory gone, at least not fatal)."""
    import os
    import subprocess

    from bench.harness.environment import ROOT

    program = (
        "import logging_conf.rotation, logging_conf.write_errors as w\n"
        "w.count('file'); w.count('console')\n"
        "print(sum(s.value for f in w.WRITE_ERRORS.collect() for s in f.samples if s.name.endswith('_total')))\n"
    )
    present = tmp_path / "metrics"
    present.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    for directory, counted in ((None, "2.0"), (present, None), (tmp_path / "gone", None)):
        run_env = env if directory is None else {**env, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        result = subprocess.run(
            [sys.executable, "-c", program],
            cwd=ROOT,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, (directory, result.stderr)
        if counted is not None:
            assert result.stdout.strip() == counted
    assert list(present.glob("counter_*.db")), "with the directory there, the count is in its files"


# --- the file under the handler: deleted, replaced, disk full --------------------------------


def _file_handler(path, clock, **options):
    from logging_conf.rotation import SharedTimedRotatingFileHandler

    handler = SharedTimedRotatingFileHandler(str(path), clock=clock, watch=False, **options)
    handler.setFormatter(JsonFormatter())
    return handler


def _messages(path) -> list[str]:
    return [json.loads(line)["message"] for line in path.read_text().splitlines()]


def _held_deleted(path) -> list[str]:
    """This process's descriptors still open on `path` after it was deleted."""
    import os

    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == f"{path} (deleted)":
            held.append(fd)
    return held


def test_a_deleted_log_file_is_reopened_at_the_next_look_and_released(tmp_path):
    from logging_conf.rotation import CHECK_SECONDS

    log = tmp_path / "app.log"
    clock = FakeClock()
    handler = _file_handler(log, clock)
    try:
        handler.emit(_record("before"))
        log.unlink()
        for n in range(50):  # within the same second of the clock: no look at the path, no stat per line
            handler.emit(_record(f"unnoticed {n}"))
        assert not log.exists()
        clock.now += CHECK_SECONDS
        handler.emit(_record("after"))
        assert _messages(log) == ["after"]
        assert _held_deleted(log), "the deleted file is closed a look later, not at once (a thread may hold it)"
        clock.now += CHECK_SECONDS
        handler.emit(_record("later"))
        assert _held_deleted(log) == [], "the deleted file is still held open: its space is not freed"
        assert _messages(log) == ["after", "later"]
    finally:
        handler.close()


def test_a_replaced_log_file_is_reopened_and_the_directory_made_again(tmp_path):
    import os
    import shutil

    from logging_conf.rotation import CHECK_SECONDS

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log = log_dir / "app.log"
    clock = FakeClock()
    handler = _file_handler(log, clock)
    try:
        handler.emit(_record("first"))
        moved = tmp_path / "moved.log"
        os.rename(log, moved)  # as logrotate does without copytruncate
        other = log_dir / "other.log"
        other.write_text(json.dumps({"message": "already there"}) + "\n")
        os.rename(other, log)  # another file renamed onto the path
        clock.now += CHECK_SECONDS
        handler.emit(_record("second"))
        assert _messages(log) == ["already there", "second"]
        assert _messages(moved) == ["first"]

        shutil.rmtree(log_dir)  # the whole directory
        clock.now += CHECK_SECONDS
        handler.emit(_record("third"))
        assert _messages(log) == ["third"]
    finally:
        handler.close()


def test_the_watcher_reopens_for_a_process_that_logs_nothing(tmp_path):
    """gunicorn's master may not log for hours: its watcher thread looks at the path anyway, so
    it too lets go of a deleted file (and its disk space) within a second or two."""
    from logging_conf.rotation import SharedTimedRotatingFileHandler

    log = tmp_path / "app.log"
    handler = SharedTimedRotatingFileHandler(str(log))  # the real clock, watched
    handler.setFormatter(JsonFormatter())
    try:
        handler.emit(_record("before"))
        log.unlink()
        wait_for(log.exists, "the watcher to reopen the deleted file", timeout=30)
        wait_for(lambda: _held_deleted(log) == [], "the watcher to close the deleted file", timeout=30)
        handler.emit(_record("after"))
        assert _messages(log) == ["after"]
    finally:
        handler.close()


def test_a_full_device_is_counted_and_reported_once_a_minute_in_one_json_line(tmp_path, capsys):
    """/dev/full answers every write with ENOSPC: the stdlib printed a multi-line traceback
    per record; here each is counted, and stderr gets one JSON line a minute."""
    import os

    from logging_conf.rotation import CHECK_SECONDS
    from logging_conf.write_errors import REPORT_SECONDS

    log = tmp_path / "app.log"
    clock = FakeClock()
    handler = _file_handler(log, clock)
    try:
        handler.emit(_record("before"))
        (tmp_path / "full").symlink_to("/dev/full")
        os.rename(log, tmp_path / "app.log.old")
        os.rename(tmp_path / "full", log)  # the path now leads to a device that is always full
        clock.now += CHECK_SECONDS
        capsys.readouterr()
        before = write_errors("file")
        for n in range(1000):
            handler.emit(_record(f"lost {n}"))
        assert write_errors("file") - before == 1000
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Logging error" not in err
        [report] = [json.loads(line) for line in err.splitlines()]
        assert report["event"] == "log_write_failed" and report["level"] == "ERROR"
        assert "No space left on device" in report["error"] and report["lost"] == 1
        assert str(log) in report["message"]

        clock.now += REPORT_SECONDS  # a minute on: the next failure reports again, with the count
        handler.emit(_record("lost again"))
        [report] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert report["lost"] == 1000

        log.unlink()  # space again (a file where the device was): reopened at the next look
        clock.now += CHECK_SECONDS
        handler.emit(_record("after"))
        assert _messages(log) == ["after"]
        assert _messages(tmp_path / "app.log.old") == ["before"]
        assert capsys.readouterr().err == ""
    finally:
        handler.close()


class ShortWrites:
    """A stream over a real descriptor whose writes stop after `room` more bytes, as write(2)
    does on a device that fills mid-line; `then` runs after each short write (another process
    appending)."""

    def __init__(self, path, room: int, then=None) -> None:
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed with the handler)
        self.room = room
        self.then = then

    def write(self, data: bytes) -> int:
        if len(data) <= self.room:
            self.room -= len(data)
            return self.file.write(data)
        written = self.file.write(data[: self.room])
        self.room = 0
        if self.then is not None:
            self.then()
        return written

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()


def test_a_line_the_disk_took_in_part_is_cut_off_again(tmp_path, capsys):
    log = tmp_path / "app.log"
    handler = _file_handler(log, FakeClock())
    try:
        handler.emit(_record("whole"))
        handler.stream.close()
        fits = len(JsonFormatter().format(_record("fits")).encode()) + 1
        handler.stream = ShortWrites(log, room=fits + 40)
        before = write_errors("file")
        handler.emit(_record("fits"))  # the room left after this one is less than a line
        handler.emit(_record("torn " + "x" * 200))
        assert write_errors("file") - before == 1
        assert log.read_text().endswith("\n"), "a torn line was left in the file"
        handler.stream.room = 10_000  # space again
        handler.emit(_record("after"))
        assert _messages(log) == ["whole", "fits", "after"]
        assert "cut off again" in json.loads(capsys.readouterr().err.splitlines()[-1])["error"]
    finally:
        handler.close()


def test_a_fragment_that_cannot_be_cut_off_ends_before_the_next_line(tmp_path):
    """If something was appended after the fragment (another process, the instant space came
    back), cutting would destroy it: the fragment stays, and our next line starts on a new line."""
    log = tmp_path / "app.log"
    handler = _file_handler(log, FakeClock())

    def another_process_appends() -> None:
        with open(log, "ab") as other:
            other.write(b"more")

    try:
        handler.stream.close()
        handler.stream = ShortWrites(log, room=20, then=another_process_appends)
        handler.emit(_record("torn " + "x" * 200))
        handler.stream.room = 10_000
        handler.emit(_record("after"))
        lines = log.read_text().splitlines()
        assert len(lines) == 2 and lines[0].endswith("more")
        assert json.loads(lines[1])["message"] == "after"
    finally:
        handler.close()
