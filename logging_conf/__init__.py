"""One logging configuration (a dictConfig dict) for the Flask app and for gunicorn.

gunicorn receives it as `logconfig_dict` (deploy/gunicorn.conf.py), so its master, its error
log and every worker's application loggers write the same JSON lines through the same handlers:
stderr (journald, containers) and one rotating file in LOG_DIR.

Why our own handler (logging_conf/rotation.py) and not the stdlib's TimedRotatingFileHandler:
with several worker processes that one is unsafe (each process rotates on its own; one renames
or deletes the file another is still writing, and lines are lost, as our rotation test showed).
Ours appends each line with one write(2) and no lock, and coordinates only the rotation itself,
with an flock: exactly one process renames the file, the others notice and reopen. It also
reopens a file deleted or replaced under it within a second or two, and neither it nor the
console handler prints a traceback per line when it cannot write (a full disk, a broken pipe):
they count the lost records and say so once a minute (logging_conf/write_errors.py).
"""

from __future__ import annotations

import json
import logging.config
from pathlib import Path
from typing import Any

FORMATTER = "logging_conf.formatter.JsonFormatter"
ROTATING_HANDLER = "logging_conf.rotation.SharedTimedRotatingFileHandler"
CONSOLE_HANDLER = "logging_conf.write_errors.ConsoleHandler"

_applied: str | None = None


def build(
    *,
    level: str = "INFO",
    log_dir: Path | None = None,
    filename: str = "app.log",
    when: str = "midnight",
    interval: int = 1,
    backup_count: int = 14,
    gzip: bool = False,
    console: bool = True,
) -> dict[str, Any]:
    """The dictConfig for these options. `log_dir=None` means no file (console only)."""
    handlers: dict[str, dict[str, Any]] = {}
    if console:
        handlers["console"] = {"class": CONSOLE_HANDLER, "formatter": "json", "stream": "ext://sys.stderr"}
    if log_dir is not None:
        handlers["file"] = {
            "class": ROTATING_HANDLER,
            "formatter": "json",
            "filename": str(Path(log_dir) / filename),
            "when": when,
            "interval": interval,
            "backupCount": backup_count,
            "gzip": gzip,
            "utc": True,  # rotation at midnight UTC, whatever the host's zone
        }
    names = list(handlers)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": FORMATTER}},
        "handlers": handlers,
        "root": {"level": level, "handlers": names},
        "loggers": {
            # gunicorn's own loggers propagate to root: same format, same files.
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
            # Access lines come from the app (they know the route, user and request id);
            # gunicorn's access log stays off so each request is logged exactly once.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "werkzeug": {"level": "WARNING", "handlers": [], "propagate": True},
            "alembic": {"level": "INFO", "handlers": [], "propagate": True},
            "alembic.runtime.plugins": {"level": "WARNING", "handlers": [], "propagate": True},
            "pgserver": {"level": "WARNING", "handlers": [], "propagate": True},
            # SQLAlchemy names pool loggers after the pool class, ours included (its
            # _sqla_logger_namespace is under "sqlalchemy"); dispose/recreate chatter is noise.
            "sqlalchemy": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }


def for_gunicorn(config: dict[str, Any]) -> dict[str, Any]:
    """Hand `config` to gunicorn as logconfig_dict, and remember that it is applied so the app
    (loaded by the same process) does not configure logging a second time."""
    global _applied
    _prepare(config)
    _applied = json.dumps(config, sort_keys=True)
    return config


def configure(config: dict[str, Any]) -> None:
    """Apply `config` unless this exact configuration is already in force in this process."""
    global _applied
    key = json.dumps(config, sort_keys=True)
    if key == _applied:
        return
    _prepare(config)
    logging.config.dictConfig(config)
    _applied = key


def _prepare(config: dict[str, Any]) -> None:
    _skip_unused_record_fields()
    if "file" in config["handlers"]:
        Path(config["handlers"]["file"]["filename"]).parent.mkdir(parents=True, exist_ok=True)


def _skip_unused_record_fields() -> None:
    """Every record would otherwise look up what no line of ours shows (FIELDS: level, logger,
    message, pid, timestamp, and the `extra` fields): the caller's file, line and function (a
    walk up the stack, `sys._getframe`), the thread's name and the multiprocessing process's
    name. The logging HOWTO's "Optimization" section names these switches. The pid stays
    (`logProcesses`); an exception keeps its own frames (`formatException`). About 2.5 us a
    record (bench/obs_cost.py)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
