"""emails in their normal form

Emails are compared and stored NFKC-normalised and case-folded (service/schemas.py
normalise_email); before, they were only lower-cased. The stored emails whose normal form
differs (only non-ASCII ones can: "straße@..." is now "strasse@...", a full-width letter its
ASCII one) are rewritten, so their owners still log in with the spelling they registered and
the unique index is again the whole rule. One whose normal form another account already holds
(two accounts the new rule calls the same) is left as it is, and its id logged: that account
is then reached only with its exact old spelling. Not reversible: the old spellings are not
kept, downgrade leaves the emails as they are.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

import logging
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def _normal(email: str) -> str:
    """service/schemas.py normalise_email as of this revision (a migration does not import the
    code it migrates for: that code may change after it)."""
    return unicodedata.normalize("NFKC", email).casefold().strip()


def upgrade() -> None:
    conn = op.get_bind()
    # ASCII emails were already in normal form (lower-cased); in a UTF8 database a non-ASCII
    # character takes more than one byte.
    rows = conn.execute(
        sa.text("SELECT id, email FROM users WHERE octet_length(email) <> char_length(email) ORDER BY id")
    ).all()
    for user_id, email in rows:
        normal = _normal(email)
        if normal == email:
            continue
        holder = conn.execute(sa.text("SELECT id FROM users WHERE email = :email"), {"email": normal}).scalar()
        if holder is not None:
            log.warning("users.id %s keeps its email: its normal form is the email of users.id %s", user_id, holder)
            continue
        conn.execute(sa.text("UPDATE users SET email = :email WHERE id = :id"), {"email": normal, "id": user_id})


def downgrade() -> None:
    pass
