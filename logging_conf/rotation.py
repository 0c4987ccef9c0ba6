"""One time-rotated log file written by many processes (gunicorn's master and its workers).

Writing takes no lock, neither between processes nor between threads. The file is opened
with O_APPEND and unbuffered, and each record is one write(2) of one whole line: the kernel
appends each write at the end of the file as one piece, so lines from several processes never
overwrite or split each other, and a line is in the file as soon as `emit` returns (a
SIGKILLed worker loses nothing it logged).

Rotation is coordinated, and only at rotation time. Every process knows the next rollover
time, a boundary on the clock (midnight UTC; for S/M/H/D a multiple of the interval since the
epoch, so processes started at different times agree on it). The first one to log past it takes
an flock on `<file>.lock`. If the file at the path is still the one it has open, it renames it
to its dated name and opens a new one; if not, another process rotated first, and it just
reopens the path. A line another process writes in the instant between the rename and its own
reopen lands in the rotated file, where its timestamp (before the rollover) belongs: nothing is
lost. With gzip, a backup is compressed one rotation later (as logrotate's `delaycompress`),
when no process can still be writing to it, on a background thread so no request waits for it.

A file deleted or replaced under the processes (`rm app.log`, a `mv` onto it, logrotate without
copytruncate) is noticed within CHECK_SECONDS: at most once per CHECK_SECONDS of the handler's
clock, the first record to be written stats the path (and a watcher thread per process does
the same for a process that is not logging, gunicorn's master, so none holds a deleted file and
its disk space): a missing file, or one with another device or inode than ours, is reopened (its
directory made again if it went too). Rotation comes first in that check, so a process never
mistakes another's rotation for a replacement and rotates twice. Cost per line: the clock read
and a comparison were already paid for the rollover time; the check adds one float comparison,
13 ns by timeit; emit of an access-sized record (its line already formatted) took 1.76 us with
the check and 1.72 us without it, 1.82 us before any of this (best of 30 x 20,000, 2-core
development machine, differences within its noise); plus one stat(2) and one fstat(2) a second.

A write that fails (ENOSPC, EIO...) loses that record, is counted and reported once a minute
(write_errors.py), and never leaves a torn line: a write the kernel took only in part (the disk
filled mid-line) is cut back off with ftruncate(2), which needs no space, if nothing was
appended after it (on a full disk nothing can be); failing that, the next line is written
after a newline, so the fragment stays one unparsable line of its own instead of corrupting the
next. Truncating was chosen over the newline because it leaves every line of the file valid
JSON, which `jq` needs. When space returns, writing simply succeeds again.

Why not concurrent-log-handler: it takes the flock, stats the file and re-reads the shared
rollover time on every record, about 35 us a line, an eighth of a whole list-page request
(measured); this handler's write is one system call.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import logging
import logging.handlers
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable

from logging_conf.write_errors import ReportsWriteErrors

CHECK_SECONDS = 1.0  # of the handler's clock, between two looks at the path
WATCH_SECONDS = 1.0  # of real time, between two rounds of the watcher thread


class SharedTimedRotatingFileHandler(ReportsWriteErrors, logging.handlers.TimedRotatingFileHandler):
    metric_label = "file"

    def __init__(
        self,
        filename: str,
        when: str = "midnight",
        interval: int = 1,
        backupCount: int = 0,  # noqa: N803 (the stdlib handler's name, so dictConfig passes it)
        utc: bool = True,
        encoding: str = "utf-8",
        gzip: bool = False,
        clock: Callable[[], float] = time.time,
        watch: bool = True,
    ) -> None:
        """`clock` says what time it is (seconds since the epoch); tests pass their own, so
        whether a record falls in the next period, or the path is due for a look, never depends
        on how fast the machine is. `watch=False`: no watcher thread looks at the path for this
        handler (only records do); for tests that drive the clock themselves."""
        existed = os.path.exists(filename)
        super().__init__(filename, when=when, interval=interval, backupCount=backupCount, encoding=encoding, utc=utc)
        self.clock = clock
        if not existed:  # the stdlib took the new file's mtime, which is the real time
            self.rolloverAt = self.computeRollover(int(clock()))
        self.gzip = gzip
        self.lock_path = self.baseFilename + ".lock"
        self._retired: list[tuple[float, object]] = []  # (when it may be closed, stream)
        self._check_at = clock() + CHECK_SECONDS
        self._torn = False  # the file ends in a fragment of ours that could not be cut off
        self._lock_file = None  # `<file>.lock` while this process holds its flock
        self.watched = watch
        _watch(self)

    def _open(self):
        return open(self.baseFilename, "ab", buffering=0)  # O_APPEND, no user-space buffer

    def handle(self, record: logging.LogRecord) -> bool:
        """As logging.Handler.handle, without taking the handler's lock for every record: one
        write(2) needs no lock, and under gthread that lock is contended by every thread."""
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):
            record = rv
        if rv:
            self.emit(record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = self.clock()
            if now >= self._check_at or now >= self.rolloverAt:
                self._keep_up(now)
            data = (self.format(record) + "\n").encode(self.encoding, "backslashreplace")
            stream = self.stream
            if self._torn:
                self._write_after_fragment(stream, data)
                return
            written = stream.write(data)  # one write(2): the kernel appends it whole, or fails
            if written != len(data):
                self._partial(stream, written, len(data), fragment_before=False)
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Nothing is buffered."""

    def watch(self) -> None:
        """What the watcher thread calls every WATCH_SECONDS: the same look at the path (and the
        same rotation) a record would make, when due on the handler's clock."""
        try:
            now = self.clock()
            if now >= self._check_at or now >= self.rolloverAt:
                self._keep_up(now)
        except Exception:
            self.handleError(None)

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802
        """As the stdlib's, on `self.clock`; never rotates what is not a regular file."""
        return self._rollover_due(int(self.clock()))

    def _rollover_due(self, now: float) -> bool:
        if now < self.rolloverAt:
            return False
        if os.path.exists(self.baseFilename) and not os.path.isfile(self.baseFilename):
            self.rolloverAt = self.computeRollover(int(now))
            return False
        return True

    def computeRollover(self, currentTime: int) -> int:  # noqa: N802, N803 (the stdlib's names)
        """For S, M, H and D, the next multiple of the interval since the epoch, where the
        stdlib says "an interval after now": every process then rotates at the same instant,
        however far apart they started (see `_keep_up`). Midnight is a boundary already."""
        if self.when in ("S", "M", "H", "D"):
            return (int(currentTime) // self.interval + 1) * self.interval
        return super().computeRollover(currentTime)

    def _keep_up(self, now: float) -> None:
        """Rotate if due, then look at the path if due; one thread at a time. Rotation comes first:
        a process that last wrote before the boundary finds another's new file at the path, and
        if it took that for a replacement and reopened it, its own rotation would then find the
        path to be its file and rename the new period's file too."""
        with self.lock:
            if self.stream is None:  # closed meanwhile
                return
            try:
                if now >= self.rolloverAt and self._rollover_due(now):
                    self.doRollover()
                if now >= self._check_at:
                    self._check_at = now + CHECK_SECONDS
                    self._close_retired(now)
                    if not self._path_is_open_file():
                        self._replace_stream(now)
            except OSError:  # the record is still written where we are; counted, tried again later
                self.handleError(None)

    def doRollover(self) -> None:  # noqa: N802 (overrides the stdlib method)
        """Threads write without the lock, so one may still hold the old stream: it is retired,
        not closed, and closed at the first look at the path a CHECK_SECONDS later (its lines
        land in the rotated file)."""
        now = self.clock()
        try:
            with self._open_creating_directory(self.lock_path, "a") as lock:
                self._lock_file = lock
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self._path_is_open_file():
                    self._rotate()
                self._replace_stream(now)
        finally:
            self._lock_file = None  # even if it failed: one attempt per period, not one per record
            self.rolloverAt = self.computeRollover(int(now))

    def _replace_stream(self, now: float) -> None:
        stream = self._open_creating_directory(self.baseFilename, None)
        self._retired.append((now + CHECK_SECONDS, self.stream))
        self.stream = stream

    def _open_creating_directory(self, path: str, mode: str | None):
        """`_open()` (mode None) or open(path, mode), making the directory first if it is gone."""
        for attempt in (1, 2):
            try:
                return self._open() if mode is None else open(path, mode)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                os.makedirs(os.path.dirname(path), exist_ok=True)

    def _close_retired(self, now: float) -> None:
        while self._retired and self._retired[0][0] <= now:
            _, stream = self._retired.pop(0)
            if stream is not None:
                stream.close()

    def _write_after_fragment(self, stream, data: bytes) -> None:
        """A line of ours was cut short and could not be removed: end it first, in the same write."""
        data = b"\n" + data
        written = stream.write(data)
        if written != len(data):
            self._partial(stream, written, len(data), fragment_before=True)
        self._torn = False

    def _partial(self, stream, written: int | None, length: int, *, fragment_before: bool) -> None:
        """The kernel took `written` bytes of a `length`-byte line (the disk filled in between):
        cut them off again if nothing was appended after them, else remember that the file ends
        in a fragment. Raises, so the record counts as lost."""
        written = written or 0
        cut = False
        if written:
            with contextlib.suppress(OSError):
                fd = stream.fileno()
                end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: where our write ended
                if os.fstat(fd).st_size == end:
                    os.ftruncate(fd, end - written)  # shrinking needs no space
                    cut = True
        self._torn = fragment_before or (written > 0 and not cut)
        part = "" if not written else "; the part was cut off again" if cut else "; the part stays a line of its own"
        raise OSError(f"short write, {written} of {length} bytes (no space left on the device?){part}")

    def close(self) -> None:
        _unwatch(self)
        with self.lock:
            for _, stream in self._retired:
                if stream is not None:
                    stream.close()
            self._retired = []
        super().close()

    def _path_is_open_file(self) -> bool:
        """Whether the path names the file we write to (False if it is gone; True if it cannot
        be told, EACCES or EIO: then we keep writing where we are)."""
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        mine = os.fstat(self.stream.fileno())
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def _rotate(self) -> None:
        """Under the flock: rename the file to its period's name, prune, compress the older."""
        started = self.rolloverAt - self.interval
        stamp = time.strftime(self.suffix, time.gmtime(started) if self.utc else time.localtime(started))
        target = self.rotation_filename(f"{self.baseFilename}.{stamp}")
        taken = 0
        while os.path.exists(target) or os.path.exists(target + ".gz"):  # never overwrite a backup
            taken += 1
            target = self.rotation_filename(f"{self.baseFilename}.{stamp}.{taken}")
        os.rename(self.baseFilename, target)
        backups = self._backups()  # oldest first
        if self.backupCount > 0:
            for path in backups[: -self.backupCount]:
                _remove(path)
            backups = backups[-self.backupCount :]
        if self.gzip:
            older = [path for path in backups if path != target and not path.endswith(".gz")]
            if older:
                threading.Thread(target=_compress, args=(older,), name="log-gzip", daemon=True).start()

    def _backups(self) -> list[str]:
        """Rotated files (`<file>.<period>[.n][.gz]`), oldest first; the time stamp sorts."""
        directory, base = os.path.split(self.baseFilename)
        return sorted(
            os.path.join(directory, name)
            for name in os.listdir(directory)
            if name.startswith(base + ".")
            and not name.endswith(".tmp")
            and any(self.extMatch.match(part) for part in name.split("."))
        )


def _compress(paths: list[str]) -> None:
    """`x` to `x.gz` through a temporary name; the original is removed only once the copy is whole."""
    for path in paths:
        partial = f"{path}.gz.{os.getpid()}.tmp"
        try:
            with open(path, "rb") as source, gzip.open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
            os.rename(partial, path + ".gz")
            _remove(path)
        except OSError:
            _remove(partial)  # another process compressed it first, or the disk is full: retried next time


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# The watcher: one daemon thread per process for all its handlers. A fork (gunicorn spawning a
# worker) waits for its round to end, so the child inherits nothing a round held, and the child
# starts its own thread (the parent's does not exist in it). Handlers are added and removed
# under another lock, never held while a handler runs: dictConfig adds and closes handlers
# holding logging's module lock, which a round's report may need.
_handlers: weakref.WeakSet[SharedTimedRotatingFileHandler] = weakref.WeakSet()
_set_lock = threading.Lock()
_round_lock = threading.Lock()
_watcher: threading.Thread | None = None


def _watch(handler: SharedTimedRotatingFileHandler) -> None:
    with _set_lock:
        _handlers.add(handler)
        _start_watcher()


def _unwatch(handler: SharedTimedRotatingFileHandler) -> None:
    with _set_lock:
        _handlers.discard(handler)


def _start_watcher() -> None:
    global _watcher
    if any(handler.watched for handler in _handlers) and (_watcher is None or not _watcher.is_alive()):
        _watcher = threading.Thread(target=_watch_forever, name="log-file-watch", daemon=True)
        _watcher.start()


def _watch_forever() -> None:
    while True:
        time.sleep(WATCH_SECONDS)
        with _round_lock:
            with _set_lock:
                handlers = [handler for handler in _handlers if handler.watched]
            for handler in handlers:
                handler.watch()


def _before_fork() -> None:
    _round_lock.acquire()


def _after_fork_in_parent() -> None:
    _round_lock.release()


def _after_fork_in_child() -> None:
    """A thread of the parent may have been rotating (holding the flock on `<file>.lock`): the
    child's copy of that descriptor would hold the lock forever, so it is closed here."""
    global _set_lock, _round_lock, _watcher
    _set_lock, _round_lock, _watcher = threading.Lock(), threading.Lock(), None
    for handler in list(_handlers):
        lock_file, handler._lock_file = handler._lock_file, None
        if lock_file is not None:
            with contextlib.suppress(OSError):
                lock_file.close()
    _start_watcher()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
