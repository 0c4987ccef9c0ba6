"""The multiprocess metrics directory of a real gunicorn: files removed under it, hundreds of
worker deaths, the master's own files, and a burst of scrapes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.scrape import metric, reported_worker_pids, scrape

pytestmark = pytest.mark.stack

WORKERS = 3
TOTAL = "flask_http_request_total"
RESTARTS = "flaskapi_worker_restarts_total"


class DirectoryWatch:
    """Lists the metrics directory every 50 ms for as long as the stack runs, remembering every
    sample file name ever seen (the master's would be `*_<master pid>.db`)."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(FileNotFoundError):  # a test removes the whole directory
                self.seen.update(name for name in os.listdir(self.directory) if name.endswith(".db"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("metrics-files")
    env = stack_env(migrated_database("test_metrics_files"), data_dir, CRASH_ROUTE_ENABLED="1", LOG_CONSOLE="0")
    with Gunicorn(env, workers=WORKERS, log_path=data_dir / "gunicorn.out") as stack:
        watch = DirectoryWatch(stack.metrics_dir)
        try:
            stack.wait_for_workers()
            stack.data_dir = data_dir
            stack.watch = watch
            yield stack
        finally:
            watch.stop()


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(stack) -> float:
    return metric(scrape(stack.metrics_url), TOTAL)


def sample_files(stack) -> list[str]:
    return sorted(path.name for path in stack.metrics_dir.glob("*.db"))


def answered(stack, count: int) -> int:
    """`count` requests at once, every one answered (404: no such book); returns `count`."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda _: requests.get(stack.url + "/books/7", timeout=30).status_code, range(count)))
    assert statuses == [404] * count
    return count


def crash_workers(stack, crashes: int, *, totals: list[float] | None = None) -> int:
    """At least `crashes` more worker deaths by the crash route, from parallel threads, with
    nothing else in flight; returns the most sample files seen meanwhile, and appends the summed
    request count of every scrape to `totals` (both read at each poll)."""
    start = metric(scrape(stack.metrics_url), RESTARTS)
    most_files = 0

    def done() -> bool:
        nonlocal most_files
        most_files = max(most_files, len(sample_files(stack)))
        samples = scrape(stack.metrics_url)
        if totals is not None:
            totals.append(metric(samples, TOTAL))
        return bool(refused) or metric(samples, RESTARTS) - start >= crashes

    stop = threading.Event()
    refused: list[str] = []

    def crasher() -> None:
        while not stop.is_set():
            try:
                response = requests.get(stack.url + "/auth/crash", timeout=30)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                continue  # the worker died under it: what was asked
            refused.append(f"{response.status_code} {response.text[:200]}")
            return

    workers = [threading.Thread(target=crasher) for _ in range(WORKERS)]
    for thread in workers:
        thread.start()
    try:
        wait_for(done, f"{crashes} worker deaths", timeout=240, interval=0.2)
    finally:
        stop.set()
        for thread in workers:
            thread.join(60)
    assert refused == []

    # Every crashed worker reaped and replaced: the same live workers for half a second (a client
    # sees its connection closed a moment before the dying worker is a zombie the master reaps).
    since: dict[frozenset[int], float] = {}

    def replaced() -> bool:
        samples = scrape(stack.metrics_url)
        pids = frozenset(reported_worker_pids(samples))
        if not metric(samples, "flaskapi_workers_alive") == WORKERS == len(pids):
            return False
        return time.monotonic() - since.setdefault(pids, time.monotonic()) >= 0.5

    wait_for(replaced, f"{WORKERS} workers alive after the crashes")
    return max(most_files, len(sample_files(stack)))


def log_lines(stack, event: str) -> list[dict]:
    return [
        line
        for path in (stack.data_dir / "logs").glob("app.log*")
        for line in map(json.loads, path.read_text().splitlines())
        if line.get("event") == event
    ]


def scrape_seconds(stack, times: int = 15) -> float:
    """The median duration of `times` scrapes, one after another."""
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        assert requests.get(stack.metrics_url, timeout=30).status_code == 200
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def test_hundreds_of_worker_deaths_leave_a_bounded_directory_and_every_count(stack):
    """Each dead worker's counters and histograms are folded into the dead workers' totals and
    its files deleted: 300 deaths leave the files and the scrape time of the start, and every
    request answered is still counted (a worker's files used to stay forever: 466 files after
    150 crashes, and every scrape read them all)."""
    answered(stack, 30)
    files_before = sample_files(stack)
    assert len(files_before) <= 4 * WORKERS, files_before
    seconds_before = scrape_seconds(stack)
    count_before = total(stack)
    restarts_before = metric(scrape(stack.metrics_url), RESTARTS)

    totals: list[float] = []  # the summed request count at every scrape, in order
    most_files = 0
    served = 0
    started = time.monotonic()
    for _ in range(6):
        served += answered(stack, 20)  # workers that count requests, then die
        most_files = max(most_files, crash_workers(stack, 50, totals=totals))
        totals.append(total(stack))
    crash_seconds = time.monotonic() - started

    samples = scrape(stack.metrics_url)
    restarts = metric(samples, RESTARTS) - restarts_before
    assert restarts >= 300
    assert metric(samples, TOTAL) - count_before == served  # the dead workers' counts are kept
    assert totals == sorted(totals), totals  # never backwards
    # counters, histograms, the exporter's info gauge (mode max): never the live gauges
    dead = ["counter_dead.db", "gauge_max_dead.db", "histogram_dead.db"]

    # once the last replacements have opened their files: as many as at the start, and the totals
    def settled_files() -> list[str] | None:
        names = sample_files(stack)
        return names if len(names) == len(files_before) + len(dead) else None

    settled = wait_for(settled_files, f"{len(files_before)} sample files and the totals", timeout=30)
    assert set(dead) <= set(settled), settled
    # at any moment: the live workers' files, those of workers dead but not reaped yet, the totals
    assert most_files <= 6 * WORKERS + len(dead), most_files
    # Measured until a quiet moment of the (shared, loaded) box: a busy moment passes, the cost
    # of reading 300 dead workers' files would not.
    measured: list[float] = []

    def as_fast_as_at_the_start() -> bool:
        measured.append(scrape_seconds(stack))
        return measured[-1] <= 1.5 * seconds_before

    try:
        wait_for(as_fast_as_at_the_start, "the median scrape within 1.5 x the start's", timeout=60, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seconds_before:.4f} s at the start, then {measured}") from None
    seconds_after = measured[-1]
    print(
        f"{restarts:.0f} worker deaths in {crash_seconds:.1f} s; scrape {seconds_before:.4f} -> {seconds_after:.4f} s"
    )


def test_sample_files_removed_under_a_running_stack_come_back_with_their_counts(stack):
    """An operator cleaning /run deletes every sample file: each worker rewrites its own within a
    second with the values it holds, the master rewrites the dead workers' totals, and the
    summed counts go on from where they were (they used to vanish until the workers restarted:
    prometheus_client keeps writing a removed file's mmap, which no scrape reads)."""
    crash_workers(stack, 2)  # so that dead workers' totals exist too
    served = answered(stack, 30)
    before = total(stack)
    assert before >= served

    seen: list[float] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            seen.append(total(stack))

    watcher = threading.Thread(target=scraper)
    watcher.start()
    try:
        removed = sample_files(stack)
        for name in removed:
            (stack.metrics_dir / name).unlink()
        more = answered(stack, 30)
        after = wait_for(lambda: (value := total(stack)) == before + more and value, "the counts to come back")
    finally:
        stop.set()
        watcher.join(30)
    assert after == before + more
    drops = sum(1 for earlier, later in itertools.pairwise(seen) if later < earlier)
    assert drops <= 1, seen

    # Every live worker has its files again; the rewrites are counted and logged.
    pids = reported_worker_pids(scrape(stack.metrics_url))
    names = sample_files(stack)
    for pid in pids:
        assert {f"counter_{pid}.db", f"histogram_{pid}.db", f"gauge_livesum_{pid}.db"} <= set(names), names
    assert {"counter_dead.db", "histogram_dead.db"} <= set(names), names
    wait_for(
        lambda: metric(scrape(stack.metrics_url), "flaskapi_metrics_files_rewritten_total") >= 3 * len(pids),
        "the rewrites to be counted",
    )
    rewrites = wait_for(lambda: log_lines(stack, "metrics_files_rewritten"), "the rewrites to be logged")
    assert {line["level"] for line in rewrites} == {"WARNING"}
    assert any("dead" in name for line in rewrites for name in line["files"])


def test_a_removed_metrics_directory_is_made_again(stack):
    """`rm -rf` of the directory itself: the workers and the master create it again."""
    before = total(stack)
    shutil.rmtree(stack.metrics_dir)
    more = answered(stack, 20)
    wait_for(lambda: total(stack) == before + more, "the counts to come back in a new directory")
    names = set(sample_files(stack))
    assert {"counter_dead.db", "histogram_dead.db"} <= names, names
    for pid in reported_worker_pids(scrape(stack.metrics_url)):
        assert f"counter_{pid}.db" in names, names


def test_the_master_writes_no_sample_file(stack):
    """The master preloads the app, so it creates every module-level metric: prometheus_client
    opened `counter_<master pid>.db` and more for them, merged as one more process that never
    dies. Only workers write files now."""
    answered(stack, 10)
    crash_workers(stack, 1)
    master = stack.pid
    assert master not in reported_worker_pids(scrape(stack.metrics_url))
    names = stack.watch.seen | set(sample_files(stack))
    assert names, "the watch saw no sample file at all"
    assert not [name for name in names if re.fullmatch(rf"\w+_{master}\.db", name)], sorted(names)
    # what the master set when it preloaded the app is in the workers' files instead
    assert metric(scrape(stack.metrics_url), "flask_exporter_info") == 1


def test_a_burst_of_scrapes_is_answered_without_a_connect_retry(stack):
    """200 scrapes connecting at once: the listener's backlog was socketserver's 5, so some SYNs
    were dropped and their connects waited the kernel's retry (1 s and more). All are answered,
    every connect at once. One thread, non-blocking sockets: no client thread waits for the GIL."""
    port = int(stack.metrics_url.split(":")[2].split("/")[0])
    request = b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    selector = selectors.DefaultSelector()
    connected: dict[int, float] = {}
    answers: dict[int, bytes] = {}
    started = time.monotonic()
    sockets = []
    try:
        for n in range(200):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
            answers[n] = b""
            selector.register(sock, selectors.EVENT_WRITE, n)
        deadline = started + 120
        while len(selector.get_map()) and time.monotonic() < deadline:
            for key, events in selector.select(timeout=1):
                sock, n = key.fileobj, key.data
                if events & selectors.EVENT_WRITE:
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    connected[n] = time.monotonic() - started
                    sock.sendall(request)
                    selector.modify(sock, selectors.EVENT_READ, n)
                    continue
                chunk = sock.recv(65536)
                if chunk:
                    answers[n] += chunk
                else:
                    selector.unregister(sock)
    finally:
        for sock in sockets:
            sock.close()
        selector.close()
    assert len(connected) == 200
    slow = sorted(seconds for seconds in connected.values() if seconds >= 1.0)
    assert slow == [], f"{len(slow)} connects waited for a retry: {slow[:5]}"
    statuses = [answer.split(b"\r\n", 1)[0] for answer in answers.values()]
    assert all(re.fullmatch(rb"HTTP/1\.[01] 200 OK", status) for status in statuses), set(statuses)
    bodies = [answer.partition(b"\r\n\r\n")[2].decode() for answer in answers.values()]
    assert all(metric(parse(body), "flaskapi_workers_alive") == WORKERS for body in bodies), [
        line for line in bodies[0].splitlines() if "workers_alive" in line
    ]
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False)
    if listening.returncode == 0 and listening.stdout.split():
        assert int(listening.stdout.split()[2]) >= 128, listening.stdout  # Send-Q of a listener: its backlog


def test_the_masters_own_counts_are_in_the_scrape(stack):
    """The master writes no file, so what it counts itself is added by its collector: here the
    failed reopens of app.log while a directory stands at its path (every process counts them
    in flaskapi_log_write_errors_total, once a second). Workers' counts are in their files, the
    master's are the scrape's excess over them."""
    name = "flaskapi_log_write_errors_total"

    def in_files() -> float:
        collector = MultiProcessCollector(None, path=str(stack.metrics_dir))
        return sum(s.value for family in collector.collect() for s in family.samples if s.name == name)

    def masters_share() -> float:
        files_before = in_files()
        scraped = metric(scrape(stack.metrics_url), name)
        files_after = in_files()  # counts only grow: at least what the workers had at the scrape
        assert scraped >= files_before
        return max(0.0, scraped - files_after)

    assert masters_share() == 0
    log = stack.data_dir / "logs" / "app.log"
    kept = log.with_name("kept.log")
    log.rename(kept)
    log.mkdir()  # no process can open app.log again
    try:
        assert wait_for(masters_share, "the master's own failed writes in the scrape", timeout=60) >= 1
    finally:
        log.rmdir()
        kept.rename(log)
