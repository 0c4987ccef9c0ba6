"""The instrumented pool, in-process: its log lines follow SQLAlchemy's, not its module's."""

from __future__ import annotations

import logging

import logging_conf
from service.observability.pool_metrics import InstrumentedQueuePool


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_pools_dispose_and_recreate_chatter_is_not_logged_at_info():
    logging_conf.configure(logging_conf.build(level="INFO"))  # the service's configuration
    recorder = Recorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        pool = InstrumentedQueuePool(lambda: None)  # never asked for a connection here
        pool.recreate().dispose()  # SQLAlchemy logs "Pool recreating", "Pool disposed" at INFO
        pool.dispose()
        pool.logger.warning("a pool warning still gets through")
    finally:
        root.removeHandler(recorder)
    messages = [record.getMessage() for record in recorder.records if record.name == pool.logger.name]
    assert messages == ["a pool warning still gets through"]
