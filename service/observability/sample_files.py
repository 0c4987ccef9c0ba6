"""The multiprocess sample files (PROMETHEUS_MULTIPROC_DIR), from a worker's start to after its death.

prometheus_client's own value class opens a process's files as soon as a metric is created, so
the gunicorn master, which creates every module-level metric when it preloads the app, had files
of its own (`counter_<master pid>.db`, ...), merged as one more process; it never notices a file
that was removed (its mmap keeps being written, invisibly, and the worker's series vanish from
every scrape until it restarts); and a dead worker's files stay forever, so the directory and
the scrape time grow with every crash. Here:

- `FileValue` (installed by `install`, from deploy/gunicorn.conf.py before any metric exists)
  keeps values in memory and writes files only in the process that called `start`: a worker,
  right after the fork. The master writes none; its own counts (`held`) are added to the scrape
  by its collector (master_metrics.py).
- `repair`, called by the worker's sampler every second, rewrites each of its files that is gone
  (an operator cleaning /run, a tmpfiles rule) with the values it holds in memory, so its counters
  go on from where they were instead of vanishing.
- `DeadWorkers`, in the master, folds a reaped worker's counters and histograms into
  `<type>_dead.db` (one file per type, the totals of every dead worker), drops its gauges and
  deletes its files: the directory holds the live workers' files and at most those few more.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import struct
import threading

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from service.observability import exemplars

log = logging.getLogger(__name__)

HEADER_BYTES = 8  # a file shorter than its header has no sample yet (MmapedDict sizes it after creating it)

# ---- in each worker --------------------------------------------------------------------------

_lock = threading.Lock()  # one per process, as prometheus_client's: all values share the files
_values: list[FileValue] = []
_files: dict[str, _File] = {}  # by prefix (`counter`, `gauge_livesum`, ...), in the writing process
_writer: int | None = None  # the pid that called `start`; any other process (the master) writes nothing
# This process's pid, kept current across forks: `_write` compares it on every sample write, and
# os.getpid() is a system call each time (glibc caches no pid).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def install() -> None:
    """Make every metric created from now on use FileValue. deploy/gunicorn.conf.py calls it
    first, before anything can create a metric (one created earlier keeps prometheus_client's
    own value, which writes files in whatever process creates it), and then sets
    PROMETHEUS_MULTIPROC_DIR if the launcher did not: `start` needs it, not this."""
    values.ValueClass = FileValue


def start() -> None:
    """In a worker right after the fork: from now on this process writes its samples to its own
    files, with every value created so far (in the master, when it preloaded the app), so every
    series is there from the start. Counters and histograms start from what the worker's file
    holds (nothing: zero; the master's counts are not the worker's, and every worker would
    repeat them); gauges keep what the master set (the exporter's `flask_exporter_info` 1)."""
    global _writer
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    with _lock:
        _writer = _pid
        _files.clear()
        for value in _values:
            value._open(directory, keep=value._prefix.startswith("gauge"))


def repair() -> list[str]:
    """Rewrite each of this worker's files that was removed or replaced, with the values it holds
    (the mmap of a removed file is still written, but no scrape reads it). Returns the file names
    rewritten; [] outside a writing worker."""
    rewritten = []
    with _lock:
        if _writer != _pid:
            return []
        for prefix, file in list(_files.items()):
            if not file.present():
                _files[prefix] = file.rewritten([v for v in _values if v._prefix == prefix])
                rewritten.append(os.path.basename(file.path))
    if rewritten:
        log.warning(
            "metrics sample files of worker %d were removed (%s): rewritten with its current values",
            os.getpid(),
            ", ".join(rewritten),
            extra={"event": "metrics_files_rewritten", "files": rewritten},
        )
    return rewritten


COUNTS = ("counter", "histogram", "summary")


def held() -> list[tuple[str, str, float]]:
    """(prefix, key, value) of the counts this process holds without writing them to a file:
    the master's (log lines it failed to write, say), which its collector adds to the scrape.
    Nothing in a worker, whose counts are in its files. Gauges are left out: the master's are
    what it set before forking, and every worker carries them."""
    if _writer == _pid:
        return []
    return [(v._prefix, v._key, v._value) for v in list(_values) if v._prefix in COUNTS]


class _File:
    """One sample file opened by this process, and which file (inode) it opened."""

    def __init__(self, path: str, data: MmapedDict | None = None) -> None:
        self.path = path
        self.data = data if data is not None else MmapedDict(path)
        self.identity = _identity(path)

    def present(self) -> bool:
        try:
            return _identity(self.path) == self.identity
        except FileNotFoundError:
            return False

    def rewritten(self, file_values: list[FileValue]) -> _File:
        """A new file at the same path holding `file_values`, written under another name and
        renamed into place, so a scrape never reads it half-written."""
        data = _write_new(self.path, ((v._key, v._value, v._timestamp) for v in file_values))
        self.data.close()
        return _File(self.path, data)


def _identity(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _write_new(path: str, samples) -> MmapedDict:
    """A fresh sample file at `path` holding `samples` (key, value, timestamp), still open.
    Written as `<path>.new` (the collector reads only `*.db`) and renamed over `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)  # the whole directory may be gone
    temporary = path + ".new"
    with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)
    data = MmapedDict(temporary)
    try:
        for key, value, timestamp in samples:
            data.write_value(key, value, timestamp)
        os.replace(temporary, path)
    except BaseException:
        data.close()
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return data


class FileValue:
    """A metric's value (prometheus_client's ValueClass interface): a float in memory, also
    written to this worker's file for its type (`counter_<pid>.db`, ...) once `start` ran in
    this process. One lock per process, as prometheus_client's MultiProcessValue."""

    _multiprocess = True

    def __init__(
        self, typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode="", **kwargs
    ) -> None:
        self._prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._value = 0.0
        self._timestamp = 0.0
        with _lock:
            _values.append(self)
            if _writer is not None and _writer == _pid:
                self._open(os.environ["PROMETHEUS_MULTIPROC_DIR"])

    def _open(self, directory: str, *, keep: bool = False) -> None:
        """Lock held, in the writing worker: this value's series in its file, the value read
        from the file or, with `keep`, the one held written to it."""
        file = _files.get(self._prefix)
        if file is None:
            file = _files[self._prefix] = _File(os.path.join(directory, f"{self._prefix}_{_writer}.db"))
        if keep:
            file.data.write_value(self._key, self._value, self._timestamp)
        else:
            self._value, self._timestamp = file.data.read_value(self._key)

    def _write(self) -> None:
        if _writer == _pid:  # not in the master, nor in a process a worker forks
            _files[self._prefix].data.write_value(self._key, self._value, self._timestamp)

    def inc(self, amount) -> None:
        with _lock:
            self._value += amount
            self._timestamp = 0.0
            self._write()

    def set(self, value, timestamp=None) -> None:
        with _lock:
            self._value = value
            self._timestamp = timestamp or 0.0
            self._write()

    def set_exemplar(self, exemplar) -> None:
        """A histogram bucket's exemplar, kept by exemplars.py beside the sample files (a
        worker's own; prometheus_client keeps none in multiprocess mode)."""
        _metric_name, name, labels, _help = json.loads(self._key)
        exemplars.keep(name, tuple(sorted(labels.items())), exemplar)

    def get(self):
        with _lock:
            return self._value

    def get_exemplar(self):
        return None


# ---- in the master ---------------------------------------------------------------------------


def _add(total, sample):
    return (total[0] + sample[0], 0.0) if total else sample


def _newest(total, sample):
    return sample if not total or sample[1] >= total[1] else total


# How a dead worker's samples join the totals, by file prefix. Counters, histograms (their
# buckets are stored per bucket, not cumulated), summaries and `sum` gauges add up; `min`/`max`
# and `mostrecent` gauges keep what the merge would have shown. Other gauges (`all`: one series
# per pid; the `live*` modes, which prometheus_client's mark_process_dead already drops) belong to
# a process that no longer exists, and are dropped.
FOLD = {
    "counter": _add,
    "histogram": _add,
    "summary": _add,
    "gauge_sum": _add,
    "gauge_min": lambda total, sample: sample if not total or sample[0] < total[0] else total,
    "gauge_max": lambda total, sample: sample if not total or sample[0] > total[0] else total,
    "gauge_mostrecent": _newest,
}
DEAD = "dead"  # the "pid" of the totals' files: `counter_dead.db`, `histogram_dead.db`, ...


class DeadWorkers:
    """The reaped workers' samples, folded into one file per type that the master writes.

    The master keeps the totals in memory too, so a totals file that was removed is rewritten
    (`restore`) before the next scrape reads the directory. `lock` is held by folding and by each
    scrape's reading of the directory: a scrape sees a dead worker's samples either in its own
    files or in the totals, never both or neither."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.totals: dict[str, dict[str, tuple[float, float]]] = {}
        self._files: dict[str, tuple[int, int]] = {}  # prefix -> identity of the totals file written

    def fold(self, pid: int) -> None:
        """After the master reaped worker `pid` (gunicorn's child_exit, before the replacement is
        forked): nothing writes its files any more. File by file, the totals file is written
        before the worker's file is deleted, so an error (a full disk) leaves that worker's file
        counted as it is, never twice."""
        with self.lock:
            for path in sorted(glob.glob(os.path.join(self.directory, f"*_{pid}.db"))):
                prefix = os.path.basename(path)[: -len(f"_{pid}.db")]
                fold = FOLD.get(prefix)
                if fold is not None:
                    totals = dict(self.totals.get(prefix, {}))
                    for key, value, timestamp in _read(path):
                        totals[key] = fold(totals.get(key), (value, timestamp))
                    self._write(prefix, totals)
                    self.totals[prefix] = totals
                _remove(path)
            for path in glob.glob(os.path.join(self.directory, f"*_{pid}.db.new")):  # a rewrite cut short
                _remove(path)

    def restore(self) -> list[str]:
        """Lock held: rewrite every totals file that was removed or replaced; their names."""
        restored = []
        for prefix, totals in sorted(self.totals.items()):
            try:
                present = _identity(self._path(prefix)) == self._files.get(prefix)
            except FileNotFoundError:
                present = False
            if present:
                continue
            try:
                self._write(prefix, totals)
            except OSError as exc:  # this scrape goes on without them; the next one tries again
                log.error(
                    "metrics: cannot rewrite the dead workers' totals %s: %s",
                    self._path(prefix),
                    exc,
                    extra={"event": "metrics_files_unwritable"},
                )
                continue
            restored.append(os.path.basename(self._path(prefix)))
        if restored:
            log.warning(
                "metrics: the dead workers' totals were removed (%s): rewritten from the master's copy",
                ", ".join(restored),
                extra={"event": "metrics_files_rewritten", "files": restored},
            )
        return restored

    def _path(self, prefix: str) -> str:
        return os.path.join(self.directory, f"{prefix}_{DEAD}.db")

    def _write(self, prefix: str, totals: dict[str, tuple[float, float]]) -> None:
        path = self._path(prefix)
        _write_new(path, [(key, value, timestamp) for key, (value, timestamp) in totals.items()]).close()
        self._files[prefix] = _identity(path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _read(path: str):
    """(key, value, timestamp) of a dead worker's file; nothing for one it had only begun to
    create, or that cannot be read (logged: those counts are lost, the scrape goes on)."""
    try:
        if os.stat(path).st_size < HEADER_BYTES:
            return []
        return [(key, value, timestamp) for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path)]
    except (OSError, RuntimeError, struct.error, UnicodeDecodeError) as exc:
        log.error(
            "metrics: cannot read %s (%s): its samples are dropped",
            path,
            exc,
            extra={"event": "metrics_file_unreadable"},
        )
        return []
