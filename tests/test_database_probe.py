"""The master's database probe (flaskapi_database_up): a scrape never waits on a database that
does not answer, and a burst of scrapes shares one check."""

from __future__ import annotations

import threading
import time

from bench.harness.polling import wait_for
from service.observability.master_metrics import SharedCheck


class HangingCheck:
    """A check that blocks until released, counting how often it ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.release.wait(60)
        with self._lock:
            self.running -= 1
        return True


def test_a_check_that_never_answers_is_not_up_within_the_wait_and_the_next_one_runs_after_it():
    check = HangingCheck()
    probe = SharedCheck(check, wait_seconds=0.2)
    try:
        began = time.monotonic()
        assert probe() is False  # the check hangs: "not up", answered after the wait
        assert time.monotonic() - began < 30
        assert probe() is False and check.calls == 1  # still that one check, not a second
    finally:
        check.release.set()
    wait_for(lambda: probe() is True, "the probe to answer once the database does")


def test_callers_that_arrive_during_a_check_share_its_answer_and_checks_never_overlap():
    check = HangingCheck()
    probe = SharedCheck(check, wait_seconds=30)
    answers: list[bool] = []
    callers = [threading.Thread(target=lambda: answers.append(probe())) for _ in range(20)]
    for caller in callers:
        caller.start()
    wait_for(lambda: check.calls == 1, "the first check to start")
    check.release.set()
    for caller in callers:
        caller.join(30)
    assert answers == [True] * 20
    assert check.most_at_once == 1  # a burst of scrapes never opens more than one connection at once
