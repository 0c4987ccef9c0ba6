"""The stale-connection check: a pooled connection that died while idle is replaced unseen."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text


def kill_pooled_connections(database_uri: str) -> int:
    """What a database restart does to the pool: every server process of the app's ends.
    pg_terminate_backend(pid, timeout) returns once the backend has exited (it only signals
    it otherwise), so the next request meets a connection that is already dead."""
    engine = create_engine(database_uri)
    with engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 60000)) FROM pg_stat_activity "
                "WHERE application_name = 'flaskapi-observability' AND datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        ).scalar()
        conn.commit()
    engine.dispose()
    return killed


@pytest.mark.parametrize("idle_seconds, expected", [("0", 200), ("3600", 503)])
def test_an_idle_connection_killed_by_the_database_is_replaced_before_use(
    make_app, database_uri, idle_seconds, expected
):
    client = make_app(DB_PING_IDLE_SECONDS=idle_seconds, DB_POOL_SIZE="1").test_client()
    assert client.get("/books/").status_code == 200  # the pool now holds one live connection
    assert kill_pooled_connections(database_uri) == 1
    response = client.get("/books/")
    # With the check (any idle time at all) the dead connection is pinged and replaced: 200. Without it
    # (the control case) the request meets the dead connection: a fast 503, never a 500.
    assert response.status_code == expected, response.get_json()
    assert client.get("/books/").status_code == 200  # either way the pool has recovered
