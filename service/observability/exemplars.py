"""Exemplars in multiprocess mode: the last observation of each histogram bucket, per worker.

prometheus_client keeps no exemplars in multiprocess mode (its value store's "TODO: Implement
exemplars for multiprocess mode"; prometheus/client_python#826). Here, as sketched there, each
worker keeps them itself, and the master merges them:

- in a worker, `keep` stores the exemplar of a bucket in a dict (one assignment, no lock, no
  write): the last one per bucket, which is all OpenMetrics lets a bucket carry. The sampler
  thread (metrics.py) calls `dump` once a second, which writes them, if any changed, to
  `exemplars_<pid>.json` beside the sample files (written aside and renamed into place). The
  file holds at most one exemplar per bucket series of the worker: it cannot grow with traffic.
- in the master, `attach` reads the live workers' files at scrape time, keeps the newest exemplar
  of each bucket, and puts it on that bucket's merged sample; the OpenMetrics exposition writes
  it, the classic text format leaves it out (prometheus_client chooses by the Accept header).
  `forget` deletes a reaped worker's file (gunicorn's child_exit, with its sample files), so a
  worker killed mid-request leaves nothing behind that grows.

Two sources feed `keep`: any histogram observed with `exemplar=` (sample_files.FileValue), and
`latency`, the request-latency histogram of prometheus-flask-exporter, which observes without
exemplars: the access line, which knows the request's trace and request ids and its duration,
records one for the bucket that duration falls in, with that duration as its value.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import json
import logging
import os
import time

from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

LATENCY_METRIC = "flask_http_request_duration_seconds"  # prometheus-flask-exporter's histogram
PREFIX = "exemplars_"
# OpenMetrics: an exemplar's label names and values, together, at most 128 UTF-8 characters
MAX_LABEL_CHARS = 128

# (bucket sample name, its labels as sorted (name, value) pairs) -> (exemplar labels, or the
# (trace id, request id) they are made of, value, unix time)
_latest: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[dict[str, str] | tuple[str, str], float, float]] = {}
_changed = False
_writer: int | None = None  # the worker that called `start`; nothing is kept in any other process
_bounds: tuple[float, ...] = ()
_les: tuple[str, ...] = ()


def start(latency_buckets) -> None:
    """In a worker right after the fork (metrics.worker_started): keep exemplars from now on."""
    global _writer, _bounds, _les, _changed
    _bounds = (*sorted(float(b) for b in latency_buckets), float("inf"))
    _les = tuple(floatToGoString(b) for b in _bounds)
    _latest.clear()
    _changed = False
    _writer = os.getpid()


def exemplar_labels(trace_id: str, request_id: str | None) -> dict[str, str]:
    """The exemplar's labels: the trace id, and the request id when both fit OpenMetrics' 128
    characters (a client may choose a request id of 128 characters; the trace id alone finds
    the log lines, which carry both)."""
    labels = {"trace_id": trace_id}
    if request_id and len("trace_id") + len(trace_id) + len("request_id") + len(request_id) <= MAX_LABEL_CHARS:
        labels["request_id"] = request_id
    return labels


def keep(sample_name: str, labels: tuple[tuple[str, str], ...], exemplar: Exemplar) -> None:
    """The exemplar of one bucket (`labels` sorted, `le` among them), replacing the one before."""
    global _changed
    if _writer is not None:
        _latest[(sample_name, labels)] = (dict(exemplar.labels), exemplar.value, exemplar.timestamp or time.time())
        _changed = True


def latency(method: str, route: str | None, status: int, duration_ms: float, trace_id: str, request_id: str) -> None:
    """The request-latency histogram's exemplar for this request (request_log.py's access line):
    the bucket the exporter counted it in, by the same labels (metrics.route's `<unmatched>`)."""
    global _changed
    if _writer is None:
        return
    seconds = duration_ms / 1000
    le = _les[bisect.bisect_left(_bounds, seconds)]
    key = (
        LATENCY_METRIC + "_bucket",
        (("le", le), ("method", method), ("route", route or "<unmatched>"), ("status", str(status))),
    )
    _latest[key] = ((trace_id, request_id), seconds, time.time())  # labels made at dump time
    _changed = True


def dump(directory: str) -> bool:
    """Write this worker's exemplars if any changed since the last dump (the sampler, once a
    second); True when written. A removed file is written again at the next change."""
    global _changed
    if _writer != os.getpid() or not _changed:
        return False
    _changed = False  # before copying: an exemplar kept meanwhile marks the next round
    snapshot = dict(_latest)  # one C-level copy, atomic under the GIL
    rows = [
        [name, dict(labels), ex_labels if isinstance(ex_labels, dict) else exemplar_labels(*ex_labels), value, ts]
        for (name, labels), (ex_labels, value, ts) in snapshot.items()
    ]
    path = path_of(directory, _writer)
    temporary = path + ".new"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(json.dumps(rows, separators=(",", ":")))  # one write, not one per token
        os.replace(temporary, path)
    except OSError:
        _changed = True  # tried again next round
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return True


def path_of(directory: str, pid: int | str) -> str:
    return os.path.join(directory, f"{PREFIX}{pid}.json")


# ---- in the master ---------------------------------------------------------------------------


def read(directory: str, pids) -> dict[tuple[str, tuple[tuple[str, str], ...]], Exemplar]:
    """The newest exemplar of each bucket over the files of the workers `pids`. A file being
    replaced, or unreadable, is skipped: a scrape never fails for an exemplar."""
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], Exemplar] = {}
    for pid in pids:
        try:
            with open(path_of(directory, pid), encoding="utf-8") as file:
                rows = json.load(file)
        except (OSError, ValueError):
            continue
        for name, labels, ex_labels, value, timestamp in rows:
            key = (name, tuple(sorted(labels.items())))
            known = merged.get(key)
            if known is None or timestamp > known.timestamp:
                merged[key] = Exemplar(ex_labels, value, timestamp)
    return merged


def attach(metrics, exemplars) -> None:
    """Put each exemplar on its bucket's sample among the merged `metrics` (prometheus_client's
    Metric objects, as MultiProcessCollector returns them)."""
    if not exemplars:
        return
    for metric in metrics:
        if metric.type != "histogram":
            continue
        samples = metric.samples
        for i, sample in enumerate(samples):
            if sample.name.endswith("_bucket"):
                exemplar = exemplars.get((sample.name, tuple(sorted(sample.labels.items()))))
                if exemplar is not None:
                    samples[i] = sample._replace(exemplar=exemplar)


def forget(directory: str, pid: int) -> None:
    """A reaped worker's exemplars go with it (its file and a rewrite cut short)."""
    for path in glob.glob(path_of(directory, pid) + "*"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
