"""Routes that exist only when FLASK_ENV=testing: faults the real-stack tests must cause.

`GET /_test/sleep?seconds=N` holds its worker for N seconds (at most MAX_SLEEP_SECONDS), as a
request stuck in Python would: the way to make a worker miss GUNICORN_TIMEOUT on purpose.
`GET /_test/error` raises, as a bug in a view would: a 500, its error line and Sentry event.
Hidden from the OpenAPI document; never registered in development or production.
"""

from __future__ import annotations

import math
import time

from flask import request

from service.errors import APIError

MAX_SLEEP_SECONDS = 120.0


def init_app(app) -> None:
    app.add_url_rule("/_test/sleep", "test_sleep", app.doc(hide=True)(sleep_for_test), methods=["GET"])
    app.add_url_rule("/_test/error", "test_error", app.doc(hide=True)(error_for_test), methods=["GET"])


def error_for_test():
    raise RuntimeError("an unexpected failure, raised on purpose by /_test/error")


def sleep_for_test():
    try:
        seconds = float(request.args.get("seconds", ""))
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:  # also refuses NaN
        raise APIError(400, f"seconds must be a number from 0 to {MAX_SLEEP_SECONDS:g}")
    time.sleep(seconds)
    return {"slept": seconds}
