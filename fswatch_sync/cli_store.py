"""The databases the commands open: a store (created if need be) or one that must already
exist, and the engines to dispose of when the command ends.

The engines are kept here, not by each command, so that :func:`fswatch_sync.cli.main` closes
their pools whichever way a command ends.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync.dburl import redact_url
from fswatch_sync.errors import FswatchSyncError
from fswatch_sync.schema import tool_metadata
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store


class DatabaseNotReady(FswatchSyncError):
    """A command that only reads found no database, or none of the tool's tables (exit 1)."""


_opened: list[Engine] = []


def track(engine: Engine) -> Engine:
    """``engine``, to be disposed of by :func:`dispose_opened` when the command ends."""
    _opened.append(engine)
    return engine


def dispose_opened() -> None:
    while _opened:
        _opened.pop().dispose()


def open_store(settings: Settings) -> Store:
    store = Store.from_settings(settings)
    track(store.engine)
    return store


_INIT_HINT = "run 'fswatch-sync init-db' (or start 'fswatch-sync run') first"


def open_existing_store(settings: Settings) -> Store:
    """The store of a database that already holds the tool's tables; creates nothing.

    Read-only commands use it: a mistyped SQLite path must not leave a new empty database
    behind, and reading must never create tables."""
    url = sa.make_url(settings.database_url)
    shown = redact_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        uri = str(url.query.get("uri", "")).lower() in ("1", "true")
        if not uri and not os.path.isfile(url.database):
            raise DatabaseNotReady(f"no database at {url.database!r} ({shown}); {_INIT_HINT}")
    store = open_store(settings)
    present = set(sa.inspect(store.engine).get_table_names())
    missing = [name for name in tool_metadata.tables if name not in present]
    if missing:
        raise DatabaseNotReady(
            f"{shown} has no {', '.join(sorted(missing))} table"
            f"{'s' if len(missing) > 1 else ''}; {_INIT_HINT}"
        )
    return store
