"""Load users for the benchmarks (bench/run.py names the class to run on the command line).

`LessonFastUser` is the lesson's user (the root locustfile's QuickstartUser: same calls, weights
and waits) on locust's FastHttpUser client, so one generator process is not the bottleneck at
1,000 users (saturation uses wrk, see bench/run.py). Every response time is kept per endpoint
(the locustfile names requests by route: `/books/[id]`) and written to BENCH_RECORDS at the end,
so percentiles are exact per endpoint and the ramp can be plotted over time; with --processes
the workers hand their records to the master, which writes them all.
"""

import json
import os
import time

from faker import Faker
from locust import FastHttpUser, events
from locust.runners import WorkerRunner

from locustfile import QuickstartUser, gather_on_master

_records: list[tuple[float, str, float, bool]] = []


@events.request.add_listener
def _record(request_type, name, response_time, exception=None, **kwargs):
    _records.append((time.time(), f"{request_type} {name}", response_time, exception is None))


def _take_records() -> list:
    taken = _records[:]
    _records.clear()
    return taken


gather_on_master("records", _take_records, _records.extend)


@events.quitting.add_listener
def _write(environment, **kwargs):
    path = os.environ.get("BENCH_RECORDS")
    if path and not isinstance(environment.runner, WorkerRunner):
        with open(path, "w") as handle:
            json.dump(_records, handle)


class LessonFastUser(FastHttpUser):
    wait_time = QuickstartUser.wait_time
    tasks = QuickstartUser.tasks
    on_start = QuickstartUser.on_start

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.books = []
        self.faker = Faker()
        self.token = None
