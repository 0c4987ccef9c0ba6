"""Database work for auth, in short transactions that return their connection at once."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from service.extensions import db
from service.models import User


def create_user(*, email: str, password_hash: str) -> dict | None:
    """Insert a user; None when the email is taken (no exception, no aborted transaction)."""
    statement = (
        pg_insert(User)
        .values(email=email, password_hash=password_hash)
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User.id, User.email, User.created_at)
    )
    with db.engine.begin() as conn:
        row = conn.execute(statement).mappings().first()
    return dict(row) if row else None


def credentials_for(*, email: str) -> tuple[int, str] | None:
    """The id and hash for an email. The connection goes back to the pool before the caller
    spends CPU on verifying the hash."""
    with db.engine.connect() as conn:
        row = conn.execute(select(User.id, User.password_hash).where(User.email == email)).first()
    return (row.id, row.password_hash) if row else None


def replace_password_hash(*, user_id: int, password_hash: str) -> None:
    with db.engine.begin() as conn:
        conn.execute(update(User).where(User.id == user_id).values(password_hash=password_hash))
