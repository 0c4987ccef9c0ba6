"""Database work for books: Core statements built once, run on short-lived connections, rows
turned straight into JSON-ready dicts (no ORM objects, no second serialisation pass)."""

from __future__ import annotations

from sqlalchemy import bindparam, delete, insert, select, update

from service.extensions import db
from service.models import Book

COLUMNS = (Book.id, Book.title, Book.author, Book.owner_id, Book.created_at, Book.updated_at)

# Built at import with bind parameters: SQLAlchemy compiles each once and caches it.
_PAGE = select(*COLUMNS).order_by(Book.id.desc()).limit(bindparam("limit"))
_PAGE_BEFORE = _PAGE.where(Book.id < bindparam("before_id"))
_GET = select(*COLUMNS).where(Book.id == bindparam("book_id"))
_EXISTS = select(Book.id).where(Book.id == bindparam("book_id"))
_INSERT = insert(Book).returning(*COLUMNS)
_DELETE_OWNED = (
    delete(Book).where(Book.id == bindparam("book_id"), Book.owner_id == bindparam("owner_id")).returning(Book.id)
)


def as_json(row) -> dict:
    """A books row (in COLUMNS order) as the API's book object."""
    return {
        "id": row[0],
        "title": row[1],
        "author": row[2],
        "owner_id": row[3],
        "created_at": row[4].isoformat(),
        "updated_at": row[5].isoformat(),
    }


def list_page(*, before_id: int | None, limit: int) -> tuple[list[dict], int | None]:
    """Newest first, keyset on the primary key: the cost of a page does not grow with the table.
    Returns the page and the cursor for the next one (None on the last page)."""
    with db.engine.connect() as conn:
        if before_id is None:
            rows = conn.execute(_PAGE, {"limit": limit + 1}).all()
        else:
            rows = conn.execute(_PAGE_BEFORE, {"limit": limit + 1, "before_id": before_id}).all()
    items = [as_json(row) for row in rows[:limit]]
    return items, (items[-1]["id"] if len(rows) > limit else None)


def get(*, book_id: int) -> dict | None:
    with db.engine.connect() as conn:
        row = conn.execute(_GET, {"book_id": book_id}).first()
    return as_json(row) if row else None


def create(*, owner_id: int, title: str, author: str | None) -> dict:
    with db.engine.begin() as conn:
        return as_json(conn.execute(_INSERT, {"owner_id": owner_id, "title": title, "author": author}).one())


def update_owned(*, book_id: int, owner_id: int, values: dict) -> tuple[dict | None, bool]:
    """Update when `owner_id` owns it. Returns (book, exists): (None, True) means not the owner."""
    statement = (
        update(Book)
        .where(Book.id == book_id, Book.owner_id == owner_id)
        .values(**values)  # updated_at: the column's onupdate
        .returning(*COLUMNS)
    )
    with db.engine.begin() as conn:
        row = conn.execute(statement).first()
        if row is not None:
            return as_json(row), True
        return None, _exists(conn, book_id)


def delete_owned(*, book_id: int, owner_id: int) -> tuple[bool, bool]:
    """Delete when `owner_id` owns it. Returns (deleted, exists)."""
    with db.engine.begin() as conn:
        if conn.execute(_DELETE_OWNED, {"book_id": book_id, "owner_id": owner_id}).first() is not None:
            return True, True
        return False, _exists(conn, book_id)


def _exists(conn, book_id: int) -> bool:
    return conn.execute(_EXISTS, {"book_id": book_id}).first() is not None
