"""One time-rotated log file written by many processes (gunicorn's master and its workers).

Writing takes no lock, neither between processes nor between threads. The file is opened
with O_APPEND and unbuffered, and each record is one write(2) of one whole line: the kernel
appends each write at the end of the file as one piece, so lines from several processes never
overwrite or split each other, and a line is in the file as soon as `emit` returns (a
SIGKILLed worker loses nothing it logged).

Rotation is coordinated, and only at rotation time. Every process knows the next rollover
time. The first one to log past it takes an flock on `<file>.lock`. If the file at the path
is still the one it has open, it renames it to its dated name and opens a new one; if not,
another process rotated first, and it just reopens the path. A line another process writes in
the instant between the rename and its own reopen lands in the rotated file, where its
timestamp (before the rollover) belongs: nothing is lost. With gzip, a backup is compressed
one rotation later (as logrotate's `delaycompress`), when no process can still be writing to
it, on a background thread so no request waits for it.

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
from collections.abc import Callable


class SharedTimedRotatingFileHandler(logging.handlers.TimedRotatingFileHandler):
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
    ) -> None:
        """`clock` says what time it is (seconds since the epoch); tests pass their own, so
        whether a record falls in the next period never depends on how fast the machine is."""
        existed = os.path.exists(filename)
        super().__init__(filename, when=when, interval=interval, backupCount=backupCount, encoding=encoding, utc=utc)
        self.clock = clock
        if not existed:  # the stdlib took the new file's mtime, which is the real time
            self.rolloverAt = self.computeRollover(int(clock()))
        self.gzip = gzip
        self.lock_path = self.baseFilename + ".lock"
        self._retired = None

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
            if self.shouldRollover(record):
                with self.lock:  # one thread rotates; the others wait, then see it is done
                    if self.shouldRollover(record):
                        self.doRollover()
            data = (self.format(record) + "\n").encode(self.encoding, "backslashreplace")
            stream = self.stream
            while data:  # a regular file takes it in one write unless the disk is full
                data = data[stream.write(data) :]
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Nothing is buffered."""

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802
        """As the stdlib's, on `self.clock`; never rotates what is not a regular file."""
        now = int(self.clock())
        if now < self.rolloverAt:
            return False
        if os.path.exists(self.baseFilename) and not os.path.isfile(self.baseFilename):
            self.rolloverAt = self.computeRollover(now)
            return False
        return True

    def doRollover(self) -> None:  # noqa: N802 (overrides the stdlib method)
        """Threads write without the lock, so one may still hold the old stream: it is retired,
        not closed, and closed at the next rotation (its lines land in the rotated file)."""
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._retired is not None:
                self._retired.close()
            if self._path_is_open_file():
                self._rotate()
            self._retired, self.stream = self.stream, self._open()
        self.rolloverAt = self.computeRollover(int(self.clock()))

    def close(self) -> None:
        if self._retired is not None:
            self._retired.close()
            self._retired = None
        super().close()

    def _path_is_open_file(self) -> bool:
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            return False
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
