"""Tables. Queries live in each blueprint's `queries.py`, not here."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, String, func
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
