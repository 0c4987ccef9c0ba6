"""`flask db-custom seed|drop`: the lesson's data commands, fast enough for benchmark-size tables.

Books are streamed with COPY in chunks (hundreds of thousands of rows per second) from pools of
Faker phrases; seeded users share one password hash, computed once, since hashing is the slow part.
"""

from __future__ import annotations

import io
import json
import random
import sys

import click
from faker import Faker
from flask import current_app
from flask.cli import AppGroup
from psycopg2 import errors as pg_errors
from sqlalchemy import text

from service.extensions import db
from service.models import AUTHOR_MAX, TITLE_MAX

db_custom = AppGroup("db-custom", help="Seed or drop the application's data.")

CHUNK = 50_000
POOL = 2_000


def _copy(cursor, table: str, columns: str, lines: list[str]) -> None:
    cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(lines)))


def _copy_field(value: str) -> str:
    """COPY text-format escaping (Faker output has no tabs or newlines, but be exact)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


@db_custom.command("seed")
@click.option("--users", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--books", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--password",
    default="seed-password",
    show_default=True,
    help="Password of every seeded user (they are test accounts).",
)
@click.option("--seed", "random_seed", default=None, type=int, help="Make the data repeatable.")
def seed(users: int, books: int, password: str, random_seed: int | None) -> None:
    """Add USERS users and BOOKS books (owned by random seeded users)."""
    faker = Faker()
    rng = random.Random(random_seed)  # noqa: S311 (reproducible demo data, not secrets)
    if random_seed is not None:
        Faker.seed(random_seed)
    password_hash = current_app.extensions["passwords"].hash(password)
    run = rng.getrandbits(32)
    titles = [_copy_field(faker.catch_phrase()[:TITLE_MAX]) for _ in range(POOL)]
    authors = [_copy_field(faker.name()[:AUTHOR_MAX]) for _ in range(POOL)]

    # One transaction for the whole seed (the engine is in autocommit for requests; this
    # connection gets a real transaction, restored when it goes back to the pool).
    with db.engine.connect().execution_options(isolation_level="READ COMMITTED") as conn:
        conn.begin()  # so that conn.commit() / rollback() reach the driver's transaction
        raw = conn.connection.driver_connection
        cursor = raw.cursor()
        emails = [f"seed-{run:08x}-{i}@example.com" for i in range(users)]
        try:
            _copy(cursor, "users", "email, password_hash", [f"{e}\t{password_hash}\n" for e in emails])
        except pg_errors.UniqueViolation:
            # The same --seed gives the same emails: a second run on one database collides.
            conn.rollback()
            raise click.ClickException(
                f"--seed {random_seed} was already used on this database (its users exist); "
                "pick another --seed, or drop the data first"
            ) from None
        cursor.execute("SELECT id FROM users WHERE email = ANY(%s)", (emails,))
        owner_ids = [row[0] for row in cursor.fetchall()]
        with click.progressbar(
            length=books, label=f"Seeding {books} books", show_pos=True, file=sys.stderr
        ) as bar:  # click 8.5 deprecates get_text_stream
            remaining = books
            while remaining:
                n = min(CHUNK, remaining)
                lines = [
                    f"{t}\t{a}\t{o}\n"
                    for t, a, o in zip(
                        rng.choices(titles, k=n), rng.choices(authors, k=n), rng.choices(owner_ids, k=n), strict=True
                    )
                ]
                _copy(cursor, "books", "title, author, owner_id", lines)
                remaining -= n
                bar.update(n)
        conn.commit()
    click.echo(f"Seeded {users} users (password {password!r}) and {books} books.")
    login = json.dumps({"email": emails[0], "password": password})
    click.echo(
        f"Log in as one of them: curl -s -X POST $API/auth/login -H 'Content-Type: application/json' -d '{login}'"
    )


@db_custom.command("drop")
@click.option("--yes", is_flag=True, help="Required in production.")
def drop(yes: bool) -> None:
    """Drop every table of the application (run `flask db upgrade` to recreate them)."""
    if current_app.config["APP_SETTINGS"].is_production and not yes:
        raise click.UsageError("refusing to drop production tables without --yes")
    db.drop_all()
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        conn.execute(text("DROP FUNCTION IF EXISTS throttle_login_check"))  # migration 0002's
    click.echo("Dropped all tables.")
