"""throttle counters

The login and registration limits, shared by every worker and host (service/auth/throttle.py):
their table, and the function that decides a login (a plpgsql function keeps its plan for the
session; planning this statement on every call cost twice its execution).

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


# Before a login: count it in the address's login window (rate); unless that refused it or the
# address is over its failure cap, count it for the (account, address) pair as if it will fail,
# with the delay that failure earns (pair; DO UPDATE ... WHERE returns no row while the pair is
# in a delay: refused); then among the address's failures (failures). `counted` is NULL when
# the attempt was refused. Delays: p_delay * 2^(n - p_free) from the p_free-th consecutive
# failure on, capped at p_delay_max (service/auth/throttle.py, Limits.delay_after). p_now: epoch
# seconds, NULL for the database's clock. Each CTE reads the one before, which fixes the order
# the three rows are locked in (the success statement locks them in the same order).
LOGIN_CHECK = """
CREATE OR REPLACE FUNCTION throttle_login_check(
    p_now double precision,
    p_login_key text,
    p_login_window integer,
    p_login_limit integer,
    p_failures_key text,
    p_failures_window integer,
    p_failures_limit integer,
    p_account_key text,
    p_free integer,
    p_delay integer,
    p_delay_max integer,
    p_max_doublings integer,
    p_reset integer
) RETURNS TABLE (
    logins integer,
    logins_retry integer,
    address_failures integer,
    failures_retry integer,
    counted integer,
    account_failures integer,
    account_retry integer
) LANGUAGE plpgsql AS $function$
#variable_conflict use_column
DECLARE
    v_now timestamptz := COALESCE(to_timestamp(p_now), now());
BEGIN
    RETURN QUERY
    WITH rate AS (
        INSERT INTO throttle_counters AS t (key, hits, expires_at)
        VALUES (p_login_key, 1, v_now + make_interval(secs => p_login_window))
        ON CONFLICT (key) DO UPDATE SET
            hits = CASE WHEN t.expires_at <= v_now THEN 1 ELSE t.hits + 1 END,
            expires_at = CASE WHEN t.expires_at <= v_now THEN EXCLUDED.expires_at ELSE t.expires_at END
        RETURNING t.hits, t.expires_at
    ),
    pair AS (
        INSERT INTO throttle_counters AS t (key, hits, expires_at, blocked_until)
        SELECT p_account_key, 1, v_now + make_interval(secs => p_reset),
            CASE WHEN 1 >= p_free THEN v_now + make_interval(secs => LEAST(p_delay_max, p_delay)) END
        FROM rate
        WHERE rate.hits <= p_login_limit AND NOT EXISTS (
            SELECT 1 FROM throttle_counters f
            WHERE f.key = p_failures_key AND f.expires_at > v_now AND f.hits >= p_failures_limit
        )
        ON CONFLICT (key) DO UPDATE SET
            hits = CASE WHEN t.expires_at <= v_now THEN 1 ELSE t.hits + 1 END,
            blocked_until = CASE
                WHEN (CASE WHEN t.expires_at <= v_now THEN 1 ELSE t.hits + 1 END) >= p_free
                THEN v_now + make_interval(secs => LEAST(
                    CAST(p_delay_max AS double precision),
                    p_delay * power(2, LEAST((CASE WHEN t.expires_at <= v_now THEN 1 ELSE t.hits + 1 END) - p_free,
                                             p_max_doublings))
                ))
            END,
            expires_at = EXCLUDED.expires_at
        WHERE t.expires_at <= v_now OR t.blocked_until IS NULL OR t.blocked_until <= v_now
        RETURNING t.hits
    ),
    failures AS (
        INSERT INTO throttle_counters AS t (key, hits, expires_at)
        SELECT p_failures_key, 1, v_now + make_interval(secs => p_failures_window) FROM pair
        ON CONFLICT (key) DO UPDATE SET
            hits = CASE WHEN t.expires_at <= v_now THEN 1 ELSE t.hits + 1 END,
            expires_at = CASE WHEN t.expires_at <= v_now THEN EXCLUDED.expires_at ELSE t.expires_at END
        RETURNING t.hits
    )
    SELECT
        rate.hits,
        CAST(GREATEST(1, CEIL(EXTRACT(EPOCH FROM rate.expires_at - v_now))) AS integer),
        COALESCE(f.hits, 0),
        CAST(GREATEST(1, CEIL(EXTRACT(EPOCH FROM f.expires_at - v_now))) AS integer),
        (SELECT hits FROM pair),
        COALESCE(a.hits, 0),
        CASE WHEN a.blocked_until > v_now
            THEN CAST(GREATEST(1, CEIL(EXTRACT(EPOCH FROM a.blocked_until - v_now))) AS integer)
        END
    FROM rate
    LEFT JOIN throttle_counters f ON f.key = p_failures_key AND f.expires_at > v_now
    LEFT JOIN throttle_counters a ON a.key = p_account_key AND a.expires_at > v_now;
END
$function$
"""


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
    op.execute(LOGIN_CHECK)


def downgrade():
    op.execute("DROP FUNCTION IF EXISTS throttle_login_check")
    op.drop_table("throttle_counters")
