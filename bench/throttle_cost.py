"""What the login and registration limits cost per request: the same requests against two apps
on one real Postgres, one with THROTTLE_ENABLED=1 and one with 0, in interleaved rounds (the
order alternating, so the box's drift lands on both), at a low argon2 cost so that the throttle's
round trips are not lost in the hashing. In-process (Flask's test client), so only the service's
own work is timed.

    python -m bench.throttle_cost [--requests 200] [--round 20] [--shipped-cost] [--db-uri postgresql://...]

Without --db-uri a throwaway PostgreSQL 16 (pgserver) is started in a temp dir and stopped at the
end. The limits are raised out of reach: every request is timed on the path that lets it through
(a refused one is cheaper still: it skips the hashing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid

from bench.harness.throwaway_postgres import database

# argon2 at its floor (1 pass, 1 MiB): about a millisecond, so the throttle's share is visible.
# --shipped-cost: OWASP's baseline (t=2, 19 MiB), what production pays, to see the share there.
FAST_HASHING = {"PASSWORD_HASH_TIME_COST": "1", "PASSWORD_HASH_MEMORY_KIB": "1024"}
SHIPPED_HASHING = {"PASSWORD_HASH_TIME_COST": "2", "PASSWORD_HASH_MEMORY_KIB": "19456"}
OUT_OF_REACH = {
    "THROTTLE_REGISTER_LIMIT": "1000000000",
    "THROTTLE_LOGIN_LIMIT": "1000000000",
    "THROTTLE_ADDRESS_FAILURES_LIMIT": "1000000000",
    "THROTTLE_ACCOUNT_FREE_FAILURES": "1000000000",
}
PASSWORD = "bench-password"


def app_config(uri: str, data_dir: str, enabled: bool, hashing: dict = FAST_HASHING) -> dict:
    return {
        "FLASK_ENV": "testing",
        "DB_URI": uri,
        "JWT_SECRET_KEY": "b" * 48,
        "DATA_DIR": data_dir,
        "LOG_TO_FILE": "0",
        "LOG_CONSOLE": "0",
        "LOG_LEVEL": "ERROR",
        "THROTTLE_ENABLED": "1" if enabled else "0",
        **hashing,
        **OUT_OF_REACH,
    }


def migrate(uri: str) -> None:
    from flask_migrate import upgrade

    from service import create_app
    from service.extensions import db

    app = create_app(app_config(uri, tempfile.gettempdir(), enabled=False))
    with app.app_context():
        upgrade()
        db.engine.dispose()


def timed(client, path: str, body: dict, expected: int) -> float:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == expected, (path, response.status_code, response.get_json())
    return elapsed


def measure(clients: dict, requests: int, round_size: int) -> dict[str, dict[str, list[float]]]:
    """{kind: {app name: [seconds per request]}} for register, login and a failed login."""
    tag = uuid.uuid4().hex[:8]
    users = {name: {"email": f"cost-{tag}-{name}@example.com", "password": PASSWORD} for name in clients}
    for name, client in clients.items():
        assert client.post("/auth/register", json=users[name]).status_code == 201
        for _ in range(20):  # warm up: connections, caches, the JIT-less paths
            client.post("/auth/login", json=users[name])
    kinds = {
        "POST /auth/register": lambda name, i: (
            "/auth/register",
            {"email": f"r-{tag}-{name}-{i}@x.io", "password": PASSWORD},
            201,
        ),
        "POST /auth/login (200)": lambda name, i: ("/auth/login", users[name], 200),
        "POST /auth/login (401)": lambda name, i: ("/auth/login", {**users[name], "password": "wrong-password"}, 401),
    }
    times: dict[str, dict[str, list[float]]] = {kind: {name: [] for name in clients} for kind in kinds}
    order = list(clients)
    for start in range(0, requests, round_size):
        for kind, make in kinds.items():
            for name in order:
                for i in range(start, min(start + round_size, requests)):
                    path, body, expected = make(name, i)
                    times[kind][name].append(timed(clients[name], path, body, expected))
        order.reverse()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests of each kind per app")
    parser.add_argument("--round", type=int, default=20, help="requests per app before switching")
    parser.add_argument("--shipped-cost", action="store_true", help="argon2 at the shipped cost (t=2, 19 MiB)")
    parser.add_argument("--db-uri", default=None, help="a database to migrate and use (default: a throwaway server)")
    args = parser.parse_args(argv)

    from service import create_app
    from service.extensions import db

    if args.db_uri is not None:
        migrate(args.db_uri)  # to head: the measurement needs the limits' tables
    with database(args.db_uri, "throttle_cost", migrate) as uri, tempfile.TemporaryDirectory() as data_dir:
        hashing = SHIPPED_HASHING if args.shipped_cost else FAST_HASHING
        apps = {name: create_app(app_config(uri, data_dir, name == "on", hashing)) for name in ("on", "off")}
        try:
            times = measure({name: app.test_client() for name, app in apps.items()}, args.requests, args.round)
        finally:
            for app in apps.values():
                with app.app_context():
                    db.engine.dispose()

    cost = "t=2 m=19 MiB (shipped)" if args.shipped_cost else "t=1 m=1 MiB"
    print(
        f"throttle cost per request: in-process, real Postgres, argon2 {cost}, "
        f"{args.requests} of each per app in rounds of {args.round}, medians"
    )
    print(f"{'request':<24} {'THROTTLE_ENABLED=0':>19} {'=1':>9} {'on/off':>7} {'added':>9}")
    for kind, by_app in times.items():
        off, on = statistics.median(by_app["off"]) * 1000, statistics.median(by_app["on"]) * 1000
        print(f"{kind:<24} {off:>16.3f} ms {on:>6.3f} ms {on / off:>7.2f} {on - off:>+6.3f} ms")


if __name__ == "__main__":
    main()
