"""The master's folding of dead workers' sample files (sample_files.DeadWorkers), on real files
written as a worker writes them and read back as the metrics endpoint merges them."""

from __future__ import annotations

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from service.observability.sample_files import DeadWorkers

REQUESTS = ("flask_http_request", "flask_http_request_total", {"method": "GET", "status": "200"}, "Requests")
LATENCY = "flask_http_request_duration_seconds"


def key(metric: str, name: str, labels: dict[str, str], help_text: str) -> str:
    return mmap_key(metric, name, list(labels), list(labels.values()), help_text)


def write(path, samples: dict[str, float]) -> None:
    data = MmapedDict(str(path))
    for sample_key, value in samples.items():
        data.write_value(sample_key, value, 0.0)
    data.close()


def worker_files(directory, pid: int, requests: float, fast: float, slow: float, in_flight: float) -> None:
    """What a worker leaves: a counter, a histogram (per-bucket counts and the sum), a live gauge."""
    write(directory / f"counter_{pid}.db", {key(*REQUESTS): requests})
    buckets = {
        key(LATENCY, LATENCY + "_bucket", {"le": "0.1"}, "Latency"): fast,
        key(LATENCY, LATENCY + "_bucket", {"le": "+Inf"}, "Latency"): slow,
        key(LATENCY, LATENCY + "_sum", {}, "Latency"): fast * 0.05 + slow * 2,
    }
    write(directory / f"histogram_{pid}.db", buckets)
    write(directory / f"gauge_livesum_{pid}.db", {key("in_progress", "in_progress", {}, "In flight"): in_flight})
    write(directory / f"gauge_max_{pid}.db", {key("capacity", "capacity", {}, "Capacity"): requests})


def merged(directory) -> dict[tuple[str, tuple], float]:
    collector = MultiProcessCollector(None, path=str(directory))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in collector.collect() for s in m.samples}


def names(directory) -> set[str]:
    return {path.name for path in directory.iterdir()}


def test_a_dead_workers_counts_join_the_totals_and_its_files_go(tmp_path):
    worker_files(tmp_path, 101, requests=5, fast=4, slow=1, in_flight=2)
    worker_files(tmp_path, 102, requests=7, fast=7, slow=0, in_flight=1)
    before = merged(tmp_path)
    dead = DeadWorkers(str(tmp_path))

    dead.fold(101)
    assert names(tmp_path) == {
        "counter_102.db",
        "histogram_102.db",
        "gauge_livesum_102.db",
        "gauge_max_102.db",
        "counter_dead.db",
        "histogram_dead.db",
        "gauge_max_dead.db",
    }
    after = merged(tmp_path)
    assert after[("in_progress", ())] == 1  # the dead worker's live gauge is gone
    assert {k: v for k, v in after.items() if k[0] != "in_progress"} == {
        k: v for k, v in before.items() if k[0] != "in_progress"
    }  # counters, histogram buckets, count and sum, the max gauge: unchanged

    dead.fold(102)
    dead.fold(102)  # a second call finds nothing
    assert names(tmp_path) == {"counter_dead.db", "histogram_dead.db", "gauge_max_dead.db"}
    final = merged(tmp_path)
    assert final[("flask_http_request_total", (("method", "GET"), ("status", "200")))] == 12
    assert final[(LATENCY + "_count", ())] == 12
    assert final[(LATENCY + "_bucket", (("le", "0.1"),))] == 11
    assert final[("capacity", ())] == 7
    assert ("in_progress", ()) not in final


def test_removed_totals_are_rewritten_from_the_masters_copy(tmp_path):
    worker_files(tmp_path, 101, requests=5, fast=4, slow=1, in_flight=0)
    dead = DeadWorkers(str(tmp_path))
    dead.fold(101)
    before = merged(tmp_path)
    for path in tmp_path.iterdir():
        path.unlink()
    assert dead.restore() == ["counter_dead.db", "gauge_max_dead.db", "histogram_dead.db"]
    assert merged(tmp_path) == before
    assert dead.restore() == []  # in place: nothing to do

    worker_files(tmp_path, 102, requests=1, fast=1, slow=0, in_flight=0)
    dead.fold(102)  # adds to the copy, not to what the removed file held
    assert merged(tmp_path)[("flask_http_request_total", (("method", "GET"), ("status", "200")))] == 6


def test_a_file_a_worker_had_only_begun_is_dropped_without_failing(tmp_path):
    (tmp_path / "counter_103.db").write_bytes(b"")
    (tmp_path / "histogram_103.db").write_bytes(b"\x00" * 4)
    DeadWorkers(str(tmp_path)).fold(103)
    assert names(tmp_path) <= {"counter_dead.db", "histogram_dead.db"}
    assert merged(tmp_path) == {}


def test_a_forked_process_knows_its_own_pid():
    """Every sample write compares the writer's pid with this process's, cached (not a system
    call per write): a process forked from a worker must not take itself for that worker and
    write into its files."""
    import os

    from service.observability import sample_files

    assert sample_files._pid == os.getpid()
    child = os.fork()
    if child == 0:  # the child reports through its exit status only
        os._exit(0 if sample_files._pid == os.getpid() else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
