"""Two app instances behind nginx (bench/harness/fleet.py: real gunicorns on one database, the
project's nginx site with both in its upstream) watched by a real Prometheus that finds them in
its target file with their `host`, under a bounded load of GETs and POSTs through nginx. The
master of instance app-1 is SIGKILLed with its process group mid-load; then:

- the clients' failures are at most the requests in flight at app-1 when it died (each failed
  request is one of them: a POST nginx had sent there, which it never replays), the GETs among
  them answered by app-2 (proxy_next_upstream). In flight is nginx's view, from its access
  line: sent to app-1 (upstream_bytes_sent), never answered by it (upstream_status 502);
- no POST ran twice: every title is at most one row, every created one exactly one;
- nginx routes around app-1: every other request from the kill to the restart is answered, by
  app-2 (the access log's upstream_addr);
- FlaskapiTargetDown fires for app-1's target only (its `instance` and `host`), never app-2's;
- app-1 started again on its ports takes traffic again (after the site's fail_timeout) and the
  alert resolves.

The rules are the repo's, time-compressed as in tests/test_alerting_stack.py (`for: 1m` is 3 s
here; promtool proves the real timing, monitoring/rules/flaskapi.rules.test.yml). The load is
bounded in count and time; every wait is a poll with a generous deadline; every process is
stopped by PID.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from dataclasses import dataclass

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.harness.fleet import Fleet
from bench.harness.polling import wait_for
from bench.harness.prometheus import Prometheus
from tests.test_alerting_stack import compressed_rules

pytestmark = [pytest.mark.stack, pytest.mark.timeout(420)]

THREADS = 4
MAX_REQUESTS = 5000  # the load's bounds: whichever comes first
MAX_SECONDS = 240
PAUSE = 0.05  # between a thread's requests: a steady load the 2 cores carry beside the rest
ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")
EXPECTED = {"GET": 200, "POST": 201}


@dataclass
class Call:
    request_id: str
    method: str
    title: str | None
    sent: float  # time.monotonic()
    answered: float | None = None  # when the answer (or the error) came
    status: int | None = None  # None: no HTTP answer at all
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status != EXPECTED[self.method]


class Load:
    """THREADS clients through nginx, each alternating a page of books and a new book (a unique
    title), every call recorded with its own X-Request-ID; until stop(), MAX_REQUESTS or
    MAX_SECONDS."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.calls: list[Call] = []
        self.numbers = itertools.count(1)
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + MAX_SECONDS
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(THREADS)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self.threads), "a client thread did not stop"

    def _client(self) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {self.token}"
            while not self.stop_event.is_set() and time.monotonic() < self.deadline:
                number = next(self.numbers)
                if number > MAX_REQUESTS:
                    return
                post = number % 2 == 0
                call = Call(
                    request_id=f"fleet-{number}",
                    method="POST" if post else "GET",
                    title=f"fleet-{number}" if post else None,
                    sent=time.monotonic(),
                )
                self.calls.append(call)
                try:
                    response = session.request(
                        call.method,
                        self.url + ("/books/" if post else "/books/?limit=5"),
                        json={"title": call.title} if post else None,
                        headers={"X-Request-ID": call.request_id},
                        timeout=40,
                    )
                    call.status = response.status_code
                except requests.RequestException as exc:
                    call.error = repr(exc)
                call.answered = time.monotonic()
                self.stop_event.wait(PAUSE)


def sign_in(url: str) -> str:
    credentials = {"email": "fleet@example.com", "password": "correct horse battery"}
    assert requests.post(url + "/auth/register", json=credentials, timeout=30).status_code == 201
    response = requests.post(url + "/auth/login", json=credentials, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["token"]


@dataclass
class Attempt:
    """One instance nginx tried for a request: what it answered ("502": nothing) and how many
    bytes nginx sent it (0: the connection was refused, it never saw the request)."""

    address: str
    status: str
    bytes_sent: int

    @property
    def lost(self) -> bool:
        """Sent to the instance, never answered by it."""
        return self.bytes_sent > 0 and self.status in ("502", "504")


def attempts(fleet: Fleet) -> dict[str, list[Attempt]]:
    """Per request id, the instances nginx tried, in order (upstream_addr, _status, _bytes_sent:
    ", " between attempts, " : " before an error page's internal redirect)."""

    def split(value: str) -> list[str]:
        return re.split(r", | : ", value)

    found = {}
    for line in fleet.nginx.access_log():
        if line["request_id"].startswith("fleet-"):
            fields = zip(
                split(line["upstream_addr"]),
                split(line["upstream_status"]),
                split(line["upstream_bytes_sent"]),
                strict=True,
            )
            found[line["request_id"]] = [
                Attempt(address, status, int(sent) if sent.isdigit() else 0)
                for address, status, sent in fields
                if ADDRESS.fullmatch(address)
            ]
    return found


def routes(fleet: Fleet) -> dict[str, list[str]]:
    """Per request id, the instances nginx tried, in order."""
    return {request_id: [a.address for a in tried] for request_id, tried in attempts(fleet).items()}


def target_down_alerts(prometheus: Prometheus) -> list[dict]:
    return [a for a in prometheus.alerts() if a["labels"]["alertname"] == "FlaskapiTargetDown"]


def test_an_instance_killed_under_load_costs_at_most_its_requests_in_flight(migrated_database, tmp_path):
    uri = migrated_database("test_fleet")
    (tmp_path / "prometheus").mkdir()
    with Fleet(tmp_path / "fleet", uri, instances=2, workers=2) as fleet:
        first, second = fleet.upstreams["app-1"], fleet.upstreams["app-2"]
        fleet.write_targets(tmp_path / "prometheus")  # beside the config Prometheus writes there
        with Prometheus(
            tmp_path / "prometheus",
            targets={},
            interval="1s",
            rule_files=compressed_rules(tmp_path / "prometheus"),
        ) as prometheus:
            # Both instances found in the target file, each with its host.
            up = wait_for(
                lambda: (s := prometheus.query('up{job="flaskapi"} == 1')) and len(s) == 2 and s,
                "both instances scraped",
            )
            assert {(s["metric"]["host"], s["metric"]["instance"]) for s in up} == set(fleet.targets.items())

            load = Load(fleet.url, sign_in(fleet.url)).start()
            try:
                # Both instances take a share of the load before the kill.
                wait_for(
                    lambda: {first, second} <= {r[-1] for r in routes(fleet).values() if r} and len(load.calls) >= 200,
                    "both instances answering the load",
                    timeout=120,
                )
                killed = time.monotonic()
                fleet.kill("app-1")
                dead = time.monotonic()
                # nginx routes around it: a share of requests sent from now on, all answered.
                wait_for(lambda: sum(c.sent > dead for c in load.calls) >= 200, "requests after the kill", 120)

                fired = wait_for(
                    lambda: [a for a in target_down_alerts(prometheus) if a["state"] == "firing"],
                    "FlaskapiTargetDown firing",
                    timeout=120,
                )
                alert_seconds = time.monotonic() - killed
                assert [a["labels"]["instance"] for a in fired] == [fleet.targets["app-1"]]
                assert [a["labels"]["host"] for a in fired] == ["app-1"]
                assert not [a for a in target_down_alerts(prometheus) if a["labels"]["host"] != "app-1"]

                restarting = time.monotonic()
                back = fleet.restart("app-1")
                restarted = time.monotonic()
                assert fleet.upstreams["app-1"] == first and fleet.targets["app-1"].endswith(f":{back.metrics_port}")

                # app-1 takes traffic again: a request sent after its restart answered by it.
                def answered_by_app_1_again() -> bool:
                    route = routes(fleet)
                    sent = [c for c in list(load.calls) if c.sent > restarted and c.answered]
                    return any(route.get(c.request_id, [None])[-1] == first for c in sent)

                wait_for(answered_by_app_1_again, "app-1 answering again", timeout=120)
                wait_for(lambda: not target_down_alerts(prometheus), "FlaskapiTargetDown resolved", timeout=120)
            finally:
                load.stop()

        # nginx has written its line for every answered request once the load has stopped.
        calls = load.calls
        wait_for(lambda: {c.request_id for c in calls if c.status} <= set(routes(fleet)), "nginx's access lines")
        tried = attempts(fleet)
        route = routes(fleet)

    # In flight at app-1 when it died, as nginx saw it: sent to app-1, never answered by it. These
    # are the requests it was serving at the kill, and any nginx wrote on a kept-alive
    # connection to it in the instant before it read that connection's close (a POST then is
    # lost as well: nginx cannot tell it from one app-1 had started on).
    in_flight = [c for c in calls if any(a.address == first and a.lost for a in tried.get(c.request_id, []))]
    # The clients' view: sent before app-1 was gone, unanswered when it was killed.
    at_kill = [c for c in calls if c.sent < dead and (c.answered is None or c.answered > killed)]
    failures = [c for c in calls if c.failed]
    assert len(calls) <= MAX_REQUESTS
    assert {c.request_id for c in failures} <= {c.request_id for c in in_flight}, [
        (c.request_id, c.method, c.status, tried.get(c.request_id), c.sent - killed, c.sent - dead) for c in failures
    ]
    assert all(c.method == "POST" and c.status == 502 for c in failures), failures  # GETs were retried
    assert all(c.status == 200 and route[c.request_id][-1] == second for c in in_flight if c.method == "GET")
    assert all(killed - 5 < c.sent < restarting for c in in_flight)  # lost at the kill, not at another time

    # From app-1's end until its restart, every other request answered, by app-2: nginx routes
    # around app-1 (tried once every fail_timeout, refused, and the request sent to app-2).
    # (Between the kill and the end, app-1 may still answer what it was finishing.)
    after = [c for c in calls if dead < c.sent < restarting and c not in in_flight]
    assert after and not [c for c in after if c.failed]
    assert {route.get(c.request_id, [None])[-1] for c in after} == {second}

    # No POST ran twice; every created book is one row, a failed one at most one.
    engine = create_engine(uri, poolclass=NullPool)
    with engine.connect() as connection:
        rows = dict(
            connection.execute(
                text("SELECT title, count(*) FROM books WHERE title LIKE 'fleet-%' GROUP BY title")
            ).all()
        )
    engine.dispose()
    posts = [c for c in calls if c.method == "POST"]
    assert max(rows.values()) == 1
    assert all(rows.get(c.title) == 1 for c in posts if not c.failed)

    taken_back = min(
        c.answered - restarted
        for c in calls
        if c.sent > restarted and c.answered and route.get(c.request_id, [None])[-1] == first
    )
    print(
        f"\nfleet: {len(calls)} requests ({len(posts)} POST), {len(failures)} failed, "
        f"{len(in_flight)} in flight at app-1 ({len(at_kill)} in flight at the kill on both; "
        f"the kill took {dead - killed:.2f} s), "
        f"FlaskapiTargetDown firing {alert_seconds:.1f} s after the kill, "
        f"app-1 answering {taken_back:.1f} s after its restart"
    )
