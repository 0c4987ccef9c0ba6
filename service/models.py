"""Tables. Queries live in each blueprint's `queries.py`, not here."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from service.extensions import db

EMAIL_MAX = 254
TITLE_MAX = 200
AUTHOR_MAX = 200
MAX_ID = 2**63 - 1  # ids are Postgres bigint: larger ones cannot exist, so they are 404 not a driver error


class User(db.Model):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # Stored normalised (stripped, lower-case), so the unique index is the whole uniqueness rule.
    email: Mapped[str] = mapped_column(String(EMAIL_MAX), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Book(db.Model):
    __tablename__ = "books"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    title: Mapped[str] = mapped_column(String(TITLE_MAX), nullable=False)
    author: Mapped[str | None] = mapped_column(String(AUTHOR_MAX), nullable=True)
    owner_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )

    # The list page is a keyset scan on the primary key (newest first); the owner index serves
    # "my books" look-ups and the ON DELETE CASCADE from users.
    __table_args__ = (Index("ix_books_owner_id_id", "owner_id", "id"),)


class ThrottleCounter(db.Model):
    """One counter of the login and registration limits (service/auth/throttle.py, which owns
    every statement on it). A row past `expires_at` counts as absent: the next hit restarts it
    and the sweep deletes it, so the table holds only the windows and delays still running.

    UNLOGGED: no WAL, so a write does not wait for a disk flush at commit (measured: half the
    time of a logged table's upsert). The price is that a database crash empties the table,
    which only forgets the counters running at that moment.
    """

    __tablename__ = "throttle_counters"

    # "<kind>|<client address>", or "account|<keyed hash of the email>|<client address>"
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    hits: Mapped[int] = mapped_column(Integer, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Account counters only: no login for this account from this address until then.
    blocked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    # Rows are updated in place on every hit; free room in each page keeps those updates HOT
    # (no new index entry, no page hop).
    __table_args__ = ({"prefixes": ["UNLOGGED"], "postgresql_with": {"fillfactor": 70}},)
