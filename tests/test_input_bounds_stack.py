"""What a client sends cannot grow the metrics: a real gunicorn with three workers, talked to
directly (http.client), as a client without nginx would."""

from __future__ import annotations

import http.client
import json
import random
import string
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.harness.environment import stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.scrape import metric, scrape
from service import create_app
from tests.conftest import TEST_SECRET

pytestmark = pytest.mark.stack

WORKERS = 3
LIMIT = 64 * 1024  # MAX_CONTENT_LENGTH's default
SERVED_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
IO_TIMEOUT = 30.0  # per socket operation: a hang fails the test instead of blocking it


@pytest.fixture(scope="module")
def stack(migrated_database, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("bounds")
    env = stack_env(migrated_database("test_bounds"), data_dir, LOG_CONSOLE="0")
    with Gunicorn(env, workers=WORKERS, log_path=data_dir / "gunicorn.out") as stack:
        wait_for(
            lambda: metric(scrape(stack.metrics_url), "flaskapi_workers_alive") == WORKERS,
            f"{WORKERS} workers alive",
        )
        stack.db_uri = env["DB_URI"]
        stack.data_dir = data_dir
        yield stack


# --- labels -------------------------------------------------------------------------------------


def _routes() -> set[str]:
    """The route templates of the service (an app that never connects to its database)."""
    app = create_app(
        {
            "FLASK_ENV": "testing",
            "JWT_SECRET_KEY": TEST_SECRET,
            "DB_URI": "postgresql+psycopg2://routes-only@127.0.0.1:9/unused",
            "DATA_DIR": tempfile.gettempdir(),
        }
    )
    return {rule.rule for rule in app.url_map.iter_rules()}


def hostile_requests(n: int, seed: int = 13) -> list[tuple[str, str]]:
    """(method, path) pairs a hostile client might send: method tokens the API does not serve
    (uppercase, lowercase, mixed, some too short or long for gunicorn) on random ids, junk
    paths and percent-encoded junk."""
    rng = random.Random(seed)
    token_chars = string.ascii_uppercase + string.digits + "!$%&'*+-.^_`|~"

    def method() -> str:
        kind = rng.random()
        length = rng.randint(3, 20) if rng.random() < 0.9 else rng.choice([1, 2, 21, 30])
        token = "".join(rng.choice(token_chars) for _ in range(length))
        if kind < 0.15:
            token = token.lower()
        elif kind < 0.3:
            token = "".join(c.lower() if rng.random() < 0.5 else c for c in token)
        return token

    def path() -> str:
        kind = rng.randrange(5)
        if kind == 0:
            return f"/books/{rng.randrange(10**20)}"
        if kind == 1:
            return "/" + "".join(rng.choice(string.ascii_letters + string.digits + "-_.~") for _ in range(12))
        if kind == 2:
            return "/books/" + "".join(f"%{rng.randrange(256):02X}" for _ in range(rng.randint(1, 12)))
        if kind == 3:
            return f"/auth/{uuid.UUID(int=rng.getrandbits(128)).hex}?q={rng.randrange(10**9)}"
        return "/" + "/".join(uuid.UUID(int=rng.getrandbits(128)).hex[:6] for _ in range(rng.randint(1, 4)))

    pairs = []
    while len(pairs) < n:
        m = method()
        if m not in SERVED_METHODS:
            pairs.append((m, path()))
    return pairs


def _send(port: int, method: str, path: str) -> int | str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


def series(url: str) -> tuple[set[tuple[str, tuple]], int]:
    """Every series the scrape reports, and the scrape's size in bytes."""
    size = len(requests.get(url, timeout=10).content)
    return {(name, tuple(sorted(labels.items()))) for name, labels, _ in scrape(url)}, size


def test_hostile_methods_and_paths_add_no_series(stack):
    routes = _routes()
    # warm up: the label combinations of ordinary traffic exist before the count
    for path in ("/books/1", "/nope"):
        requests.get(stack.url + path, timeout=10)
    before, size_before = series(stack.metrics_url)

    pairs = hostile_requests(1000)
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda pair: _send(stack.port, *pair), pairs))
    after, size_after = series(stack.metrics_url)

    new = sorted(after - before)
    grown = f"{len(new)} new series, scrape {size_before} -> {size_after} bytes, e.g. {new[:20]}"
    assert len(new) <= 10, grown
    assert size_after <= size_before * 1.05 + 4096, grown
    unanswered = [(pair, a) for pair, a in zip(pairs, answers, strict=True) if not isinstance(a, int)]
    assert unanswered == []
    server_errors = [(pair, a) for pair, a in zip(pairs, answers, strict=True) if a >= 500]
    assert server_errors == []
    assert set(answers) <= {400, 405}, sorted(set(answers))

    for name, labels in after:
        values = dict(labels)
        if "method" in values:
            assert values["method"] in SERVED_METHODS | {"other"}, (name, values)
        if "route" in values:
            assert values["route"] in routes | {"<unmatched>"}, (name, values)
        if "status" in values:
            assert values["status"].isdigit() and 100 <= int(values["status"]) <= 599, (name, values)


def test_an_unknown_method_is_405_in_the_error_shape_and_logged(stack):
    request_id = f"bounds-{uuid.uuid4().hex[:12]}"
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=IO_TIMEOUT)
    conn.request("CARD001", "/books/1", headers={"X-Request-ID": request_id})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 405
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("X-Request-ID") == request_id
    allow = {m.strip() for m in response.getheader("Allow").split(",")}
    assert allow == {"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"}
    assert body["error"]["code"] == "method_not_allowed" and body["error"]["request_id"] == request_id

    def logged():
        for path in (stack.data_dir / "logs").glob("app.log*"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("request_id") == request_id:
                    return record
        return None

    record = wait_for(logged, "the access line of the refused request")
    assert record["event"] == "access"
    assert (record["method"], record["path"], record["status"], record["route"]) == ("CARD001", "/books/1", 405, None)
