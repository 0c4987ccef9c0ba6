"""throttle counters

The login and registration limits, shared by every worker and host (service/auth/throttle.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    # UNLOGGED and fillfactor: see ThrottleCounter in service/models.py.
    op.create_table(
        "throttle_counters",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_throttle_counters")),
        prefixes=["UNLOGGED"],
        postgresql_with={"fillfactor": 70},
    )


def downgrade():
    op.drop_table("throttle_counters")
