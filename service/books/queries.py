"""Database work for books: Core statements on short-lived connections, columns not ORM objects."""
from __future__ import annotations

from sqlalchemy import delete, func, select, update

from service.extensions import db
from service.models import Book

COLUMNS = (Book.id, Book.title, Book.author, Book.owner_id, Book.created_at, Book.updated_at)


def list_page(*, before_id: int | None, limit: int) -> tuple[list[dict], int | None]:
    """Newest first, keyset on the primary key: the cost of a page does not grow with the table.
    Returns the page and the cursor for the next one (None on the last page)."""
    statement = select(*COLUMNS).order_by(Book.id.desc()).limit(limit + 1)
    if before_id is not None:
        statement = statement.where(Book.id < before_id)
    with db.engine.connect() as conn:
        rows = [dict(row) for row in conn.execute(statement).mappings()]
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1]["id"]
    return rows, None


def get(*, book_id: int) -> dict | None:
    with db.engine.connect() as conn:
        row = conn.execute(select(*COLUMNS).where(Book.id == book_id)).mappings().first()
    return dict(row) if row else None


def create(*, owner_id: int, title: str, author: str | None) -> dict:
    statement = db.insert(Book).values(owner_id=owner_id, title=title, author=author).returning(*COLUMNS)
    with db.engine.begin() as conn:
        return dict(conn.execute(statement).mappings().one())


def update_owned(*, book_id: int, owner_id: int, values: dict) -> tuple[dict | None, bool]:
    """Update when `owner_id` owns it. Returns (book, exists): (None, True) means not the owner."""
    statement = (
        update(Book)
        .where(Book.id == book_id, Book.owner_id == owner_id)
        .values(**values, updated_at=func.now())
        .returning(*COLUMNS)
    )
    with db.engine.begin() as conn:
        row = conn.execute(statement).mappings().first()
        if row is not None:
            return dict(row), True
        return None, _exists(conn, book_id)


def delete_owned(*, book_id: int, owner_id: int) -> tuple[bool, bool]:
    """Delete when `owner_id` owns it. Returns (deleted, exists)."""
    statement = delete(Book).where(Book.id == book_id, Book.owner_id == owner_id).returning(Book.id)
    with db.engine.begin() as conn:
        if conn.execute(statement).first() is not None:
            return True, True
        return False, _exists(conn, book_id)


def _exists(conn, book_id: int) -> bool:
    return conn.execute(select(Book.id).where(Book.id == book_id)).first() is not None
