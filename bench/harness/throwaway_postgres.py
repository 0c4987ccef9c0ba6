"""A database for a one-off measurement: the one given, or one on a throwaway embedded Postgres."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def database(uri: str | None, name: str, prepare: Callable[[str], None] = lambda uri: None) -> Iterator[str]:
    """`uri` as given (the caller's own database, left as it is); or database `name` on a throwaway
    embedded Postgres, `prepare(uri)`d (migrations, seed) and removed with its data directory
    afterwards."""
    if uri is not None:
        yield uri
        return
    from service import devdb

    pgdata = Path(tempfile.mkdtemp(prefix="fapg-bench-", dir="/tmp"))  # short: Unix socket paths
    handle = devdb.server(pgdata, cleanup_mode="stop")
    try:
        uri = devdb.create_database(handle, name)
        prepare(uri)
        yield uri
    finally:
        handle.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)
