"""Exemplars under multiprocess (service/observability/exemplars.py) on real files: a worker
keeps the last one per bucket and writes them beside its sample files; the master merges the
live workers' and serves them in OpenMetrics only; a reaped worker's file goes. The real-stack
path (gunicorn workers, Prometheus' exemplar storage) is in test_trace_stack.py."""

from __future__ import annotations

import json
import os

import pytest
from prometheus_client import Histogram, values
from prometheus_client.exposition import generate_latest as classic_text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_text
from prometheus_client.samples import Exemplar, Sample

from service.observability import exemplars
from service.observability.metrics import LATENCY_BUCKETS
from service.observability.sample_files import FileValue

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
BUCKET = exemplars.LATENCY_METRIC + "_bucket"


@pytest.fixture
def worker(monkeypatch):
    """This process as a worker that keeps exemplars; as it was afterwards."""
    monkeypatch.setattr(exemplars, "_writer", None)
    monkeypatch.setattr(exemplars, "_latest", {})
    monkeypatch.setattr(exemplars, "_changed", False)
    exemplars.start(LATENCY_BUCKETS)
    return os.getpid()


def rows(path) -> list:
    return json.loads(path.read_text())


def test_nothing_is_kept_outside_a_worker(monkeypatch, tmp_path):
    monkeypatch.setattr(exemplars, "_writer", None)
    monkeypatch.setattr(exemplars, "_latest", {})
    exemplars.latency("GET", "/books/", 200, 12.0, TRACE, "r-1")
    assert exemplars._latest == {} and not exemplars.dump(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_last_request_of_each_bucket_is_kept_and_the_file_stays_bounded(worker, tmp_path):
    exemplars.latency("GET", "/books/", 200, 3.0, TRACE, "r-first")
    exemplars.latency("GET", "/books/", 200, 4.0, "a" * 32, "r-last")  # same bucket (le 0.005): replaces it
    exemplars.latency("GET", "/books/", 200, 60.0, "b" * 32, "r-slow")  # le 0.075
    exemplars.latency("GET", None, 404, 99_000.0, "c" * 32, "r-inf")  # beyond the last bound: +Inf, <unmatched>
    assert exemplars.dump(str(tmp_path))
    path = tmp_path / f"exemplars_{worker}.json"
    kept = {(labels["le"], labels["route"]): (ex, value) for _, labels, ex, value, _ in rows(path)}
    assert kept == {
        ("0.005", "/books/"): ({"trace_id": "a" * 32, "request_id": "r-last"}, 0.004),
        ("0.075", "/books/"): ({"trace_id": "b" * 32, "request_id": "r-slow"}, 0.06),
        ("+Inf", "<unmatched>"): ({"trace_id": "c" * 32, "request_id": "r-inf"}, 99.0),
    }
    assert not exemplars.dump(str(tmp_path))  # nothing changed: not written again

    # 20,000 requests over two series: never more rows than buckets x series
    for i in range(20_000):
        exemplars.latency("GET", "/books/", 200 if i % 2 else 404, (i % 400) / 10, f"{i:032x}", f"r-{i}")
    exemplars.dump(str(tmp_path))
    size = path.stat().st_size
    assert len(rows(path)) <= (len(LATENCY_BUCKETS) + 1) * 3
    for i in range(20_000):
        exemplars.latency("GET", "/books/", 200 if i % 2 else 404, (i % 400) / 10, f"{i + 1:032x}", f"r-{i}")
    exemplars.dump(str(tmp_path))
    assert path.stat().st_size <= size * 1.01
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_a_request_id_that_would_break_the_128_character_limit_is_left_out():
    assert exemplars.exemplar_labels(TRACE, "r" * 78) == {"trace_id": TRACE, "request_id": "r" * 78}
    assert exemplars.exemplar_labels(TRACE, "r" * 79) == {"trace_id": TRACE}
    assert exemplars.exemplar_labels(TRACE, "r" * 128) == {"trace_id": TRACE}


def test_a_histogram_observed_with_an_exemplar_keeps_it_through_the_value_class(worker, monkeypatch, tmp_path):
    """prometheus_client's own API (observe(amount, exemplar=)) on the multiprocess value class."""
    monkeypatch.setattr(values, "ValueClass", FileValue)
    histogram = Histogram("job_seconds", "Job duration", registry=None, buckets=(0.1, 1.0))
    histogram.observe(0.5, exemplar={"trace_id": TRACE})
    exemplars.dump(str(tmp_path))
    [(name, labels, ex_labels, value, _)] = rows(tmp_path / f"exemplars_{worker}.json")
    assert (name, labels, ex_labels, value) == ("job_seconds_bucket", {"le": "1.0"}, {"trace_id": TRACE}, 0.5)


def write(directory, pid: int, entries) -> None:
    data = [[BUCKET, labels, {"trace_id": trace}, value, ts] for labels, trace, value, ts in entries]
    (directory / f"exemplars_{pid}.json").write_text(json.dumps(data))


def latency_metric() -> Metric:
    """The merged histogram as MultiProcessCollector returns it."""
    metric = Metric(exemplars.LATENCY_METRIC, "Flask HTTP request duration in seconds", "histogram")
    for le, count in (("0.005", 1.0), ("0.075", 3.0), ("+Inf", 3.0)):
        metric.samples.append(Sample(BUCKET, {"method": "GET", "route": "/", "status": "200", "le": le}, count))
    metric.samples.append(
        Sample(exemplars.LATENCY_METRIC + "_count", {"method": "GET", "route": "/", "status": "200"}, 3)
    )
    metric.samples.append(
        Sample(exemplars.LATENCY_METRIC + "_sum", {"method": "GET", "route": "/", "status": "200"}, 0.1)
    )
    return metric


class Registry:
    def __init__(self, metrics) -> None:
        self.metrics = metrics

    def collect(self):
        return self.metrics


def test_the_master_keeps_the_newest_of_the_live_workers_and_serves_them_in_openmetrics_only(tmp_path):
    series = {"method": "GET", "route": "/", "status": "200"}
    write(tmp_path, 11, [({**series, "le": "0.075"}, "1" * 32, 0.05, 100.0)])
    write(
        tmp_path,
        12,
        [({**series, "le": "0.075"}, "2" * 32, 0.06, 200.0), ({**series, "le": "0.005"}, "3" * 32, 0.001, 50.0)],
    )
    write(tmp_path, 13, [({**series, "le": "+Inf"}, "9" * 32, 40.0, 300.0)])  # not live: left out
    (tmp_path / "exemplars_14.json").write_text('[["cut short')  # being replaced: skipped, no error
    merged = exemplars.read(str(tmp_path), ["11", "12", "14", "15"])
    assert {dict(labels)["le"]: ex.labels["trace_id"] for (_, labels), ex in merged.items()} == {
        "0.075": "2" * 32,
        "0.005": "3" * 32,
    }
    metric = latency_metric()
    exemplars.attach([metric], merged)
    text = openmetrics_text(Registry([metric])).decode()
    bucket = BUCKET + '{le="%s",method="GET",route="/",status="200"}'
    assert f'{bucket % "0.075"} 3.0 # {{trace_id="{"2" * 32}"}} 0.06 200.0\n' in text
    assert f'{bucket % "0.005"} 1.0 # {{trace_id="{"3" * 32}"}} 0.001 50.0\n' in text
    assert f"{bucket % '+Inf'} 3.0\n" in text
    classic = classic_text(Registry([metric])).decode()
    assert "trace_id" not in classic and 'route="/",status="200"} 3.0\n' in classic


def test_a_reaped_workers_file_and_a_rewrite_it_left_go(tmp_path):
    for name in ("exemplars_21.json", "exemplars_21.json.new", "exemplars_211.json", "histogram_21.db"):
        (tmp_path / name).write_text("[]")
    exemplars.forget(str(tmp_path), 21)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exemplars_211.json", "histogram_21.db"]


def test_exemplar_timestamps_are_kept_from_the_observation(worker, tmp_path):
    exemplars.keep(BUCKET, (("le", "0.1"),), Exemplar({"trace_id": TRACE}, 0.05, 1234.5))
    exemplars.dump(str(tmp_path))
    [(_, _, _, _, timestamp)] = rows(tmp_path / f"exemplars_{worker}.json")
    assert timestamp == 1234.5
