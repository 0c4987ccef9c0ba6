"""A failed statement never puts the values bound to it in a log line or a Sentry event
(`hide_parameters`, service/database.py): they are what clients sent, or secrets."""

from __future__ import annotations

import json
import logging

import pytest
import sentry_sdk
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from bench.harness.sentry_receiver import SentryReceiver
from service.extensions import db

MARKER = "bound-value-5f2c9e"  # stands for an email, a title, a user id from a token
# Postgres's message ("division by zero") does not echo the values: what shows them is
# SQLAlchemy's "[parameters: ...]" part of the error, which hide_parameters removes.
FAILING = text("SELECT 1 / :zero WHERE :marker <> ''")


@pytest.fixture
def receiver():
    with SentryReceiver() as receiver:
        yield receiver
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.init()  # no DSN: an inactive client for the rest of the session


def test_a_database_error_shows_the_sql_but_not_its_parameters(make_app, tmp_path, receiver):
    app = make_app(LOG_DIR=str(tmp_path / "logs"), LOG_CONSOLE="0", SENTRY_DSN=receiver.dsn)

    @app.get("/failing-statement")
    def failing_statement():
        with db.engine.connect() as conn:
            conn.execute(FAILING, {"zero": 0, "marker": MARKER})

    with app.app_context(), pytest.raises(sa_exc.DataError) as raised, db.engine.connect() as conn:
        conn.execute(FAILING, {"zero": 0, "marker": MARKER})
    assert "division by zero" in str(raised.value) and MARKER not in str(raised.value)

    response = app.test_client().get("/failing-statement", headers={"X-Request-ID": "db-error-1"})
    assert response.status_code == 500
    for handler in logging.getLogger().handlers:
        handler.flush()
    log = (tmp_path / "logs" / "app.log").read_text()
    [error] = [
        line
        for line in map(json.loads, log.splitlines())
        if line.get("request_id") == "db-error-1" and "exc_info" in line
    ]
    assert error["level"] == "ERROR" and error["exc_info"]["type"] == "DataError"
    assert "SELECT 1 / %(zero)s" in error["exc_info"]["message"]  # the statement is there...
    assert "parameters hidden" in error["exc_info"]["message"]
    assert MARKER not in log  # ...its values are not, anywhere in the file

    sentry_sdk.flush(5)
    receiver.wait_for(lambda e: e.get("tags", {}).get("request_id") == "db-error-1")
    raw = b"".join(receiver.raw).decode()
    assert "division by zero" in raw  # the envelope was read: the absence below means something
    assert MARKER not in raw
