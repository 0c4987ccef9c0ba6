"""The app with Sentry tracing on (the Flask and SQLAlchemy integrations), one failing request,
then a flush. Run by tests/test_sentry.py as `python -m tests.programs.sentry_tracing` from the
repo root, in a process of its own: sentry-sdk installs an integration once per process, and
never after it was disabled there.

TEST_DB_URI, TEST_TMP and TEST_DSN say where the database, the data and the receiver are;
TEST_QUERY and TEST_HEADERS (JSON) are the query string and headers sent (the test checks which
of their values reach the receiver).
"""

import json
import os
from pathlib import Path

import sentry_sdk

from service import create_app
from tests.conftest import base_config

app = create_app(
    base_config(
        os.environ["TEST_DB_URI"],
        Path(os.environ["TEST_TMP"]),
        SENTRY_DSN=os.environ["TEST_DSN"],
        SENTRY_TRACES_SAMPLE_RATE="1",
    )
)


@app.post("/explode")
def explode():
    from sqlalchemy import text

    from service.extensions import db

    db.session.execute(text("SELECT 1"))  # a query span for the SQLAlchemy integration
    raise RuntimeError("kaboom with tracing")


response = app.test_client().post(
    f"/explode?{os.environ['TEST_QUERY']}", json={"title": "t"}, headers=json.loads(os.environ["TEST_HEADERS"])
)
assert response.status_code == 500, response.status_code
sentry_sdk.flush(60)  # the process exits next: whatever is still queued then is lost
