"""When SQLite's write-ahead log is copied back into the database file during a bulk pass.

By default a connection checkpoints inside the commit that takes the log past 1,000 pages: the
batch that happens to cross it waits for a copy of every page the batches before it dirtied, and
a sweep whose batches touch the same index pages again and again copies them again and again.
During a bulk pass (a sweep) the tool's write transactions instead leave the log to grow and
checkpoint after their commit (the write lock released, other writers unhindered) every
:data:`BULK_COMMITS` commits and when the sweep ends. Every other connection, the host's
included, keeps SQLite's own policy; the checkpoint is PASSIVE, so it never waits for a reader
or a writer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection, Engine

# Commits of a bulk pass between two checkpoints: an hourly sweep needs one or two, and the log
# of even the largest batches stays in the tens of MiB.
BULK_COMMITS = 25
# SQLite's own threshold, given back to the connection after each bulk commit.
DEFAULT_AUTOCHECKPOINT_PAGES = 1000


def _driver(connection: Connection) -> Any:
    return connection.connection.driver_connection


def applies(engine: Engine) -> bool:
    """Whether ``engine`` writes through a write-ahead log this module manages: a SQLite file
    (the WAL mode itself is the file's; a checkpoint of a rollback journal does nothing)."""
    database = engine.url.database
    return engine.dialect.name == "sqlite" and bool(database) and database != ":memory:"


def defer(connection: Connection) -> None:
    """This transaction's commit does not checkpoint (call inside the transaction)."""
    _driver(connection).execute("PRAGMA wal_autocheckpoint = 0")


def after_commit(connection: Connection, *, checkpoint: bool) -> None:
    """Checkpoint now if asked, then give the connection SQLite's own policy back. Call with no
    transaction open."""
    driver = _driver(connection)
    if checkpoint:
        driver.execute("PRAGMA wal_checkpoint(PASSIVE)")
    driver.execute(f"PRAGMA wal_autocheckpoint = {DEFAULT_AUTOCHECKPOINT_PAGES}")


def checkpoint(connection: Connection) -> None:
    """A PASSIVE checkpoint now (no transaction open on ``connection``)."""
    _driver(connection).execute("PRAGMA wal_checkpoint(PASSIVE)")


class BulkPass:
    """The commits of a bulk pass since its last checkpoint."""

    def __init__(self) -> None:
        self.commits = 0

    def after(self, connection: Connection, *, committed: bool) -> None:
        if committed:
            self.commits += 1
        due = self.commits >= BULK_COMMITS
        if due:
            self.commits = 0
        if committed or not connection.invalidated:
            after_commit(connection, checkpoint=due)
