"""What the client-side statement deadline costs (service/database.py): `SELECT 1` on two
psycopg2 connections to one real Postgres, a plain one and one made by the service's
connection factory (its cursor arms and disarms the watchdog around every round trip), in
interleaved rounds so that the machine's drift lands on both.

    python -m bench.db_deadline_cost [--statements 20000] [--rounds 7] [--db-uri postgresql://...]

Without --db-uri a throwaway PostgreSQL 16 (pgserver) is started in a temp dir (reached over its
Unix socket, as the tests and `make run` reach theirs) and stopped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg2
from sqlalchemy.engine import make_url

from bench.harness.throwaway_postgres import database
from service.database import Deadlines


def per_statement_us(conn, statements: int) -> tuple[float, float]:
    """(wall, this process's CPU) microseconds a statement: the CPU time leaves out the server's
    work and the waits, so it shows the client's own cost even on a busy machine."""
    cursor = conn.cursor()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(statements):
        cursor.execute("SELECT 1")
        cursor.fetchone()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return wall / statements * 1e6, cpu / statements * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--db-uri")
    args = parser.parse_args()
    with database(args.db_uri, "deadline_cost") as uri:
        dsn = make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)
        deadlines = Deadlines(statement_s=11.0, ping_s=2.0, connect_s=3)
        plain = psycopg2.connect(dsn)
        guarded = psycopg2.connect(dsn, connection_factory=deadlines.connection_factory())
        for conn in (plain, guarded):
            conn.autocommit = True
            per_statement_us(conn, 1000)  # warm up
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "deadline": []}
        for round_no in range(args.rounds):
            order = [("plain", plain), ("deadline", guarded)]
            for name, conn in order if round_no % 2 == 0 else reversed(order):
                times[name].append(per_statement_us(conn, args.statements))
        plain.close()
        guarded.close()
    medians = {}
    for name, values in times.items():
        medians[name] = [statistics.median(v[i] for v in values) for i in (0, 1)]
        wall = ", ".join(f"{v[0]:.1f}" for v in values)
        print(f"{name:9s} wall {medians[name][0]:6.1f} us, CPU {medians[name][1]:6.1f} us a statement  ({wall})")
    for i, what in enumerate(("wall", "CPU")):
        cost = medians["deadline"][i] - medians["plain"][i]
        print(f"deadline cost, {what}: {cost:+.1f} us a statement ({cost / medians['plain'][i] * 100:+.1f} %)")


if __name__ == "__main__":
    main()
