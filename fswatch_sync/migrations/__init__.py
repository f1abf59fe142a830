"""The Alembic history of fswatch_sync's own tables (``fswatch_sync.schema.tool_metadata``).

The host's tables are never part of it: the embedded default's two host tables are created by
``init-db`` and a mapped host schema belongs to the host.

Three ways to run it:

- ``fswatch-sync db upgrade`` (or :func:`upgrade` from Python);
- from the host's own Alembic ``env.py`` (Flask-Migrate included), in the same connection, after
  the host's migrations: ``fswatch_sync.migrations.upgrade(connection)``;
- inside the host's history: add ``fswatch_sync:migrations/versions`` to its
  ``version_locations`` and run ``alembic upgrade heads`` (this history is the branch labelled
  ``fswatch_sync``; its revision is then kept in the host's version table).

The first two keep the revision in ``fswatch_sync_alembic_version``, never in the host's
``alembic_version``.

Adding a revision (a column or table added to ``tool_metadata``):

1. on a scratch database brought to the current head
   (``alembic -c fswatch_sync/migrations/alembic.ini -x url=sqlite:///scratch.db upgrade head``),
   ``alembic -c fswatch_sync/migrations/alembic.ini -x url=sqlite:///scratch.db revision
   --autogenerate --rev-id 0003 -m "what changed"`` drafts ``versions/0003_what_changed.py``;
   read and trim it (MariaDB needs ``mysql_length`` on an index over a TEXT column);
2. add its entry to :data:`LAYOUT_MARKERS`: how to recognise a database that already has the
   change without a recorded revision (tables made by ``create_all`` in ``init-db`` or at start);
   a new table must then be created only when absent;
3. ``pytest tests/test_migrations.py``: the drift check fails until the history matches
   ``tool_metadata`` on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.environment import NameFilterParentNames, NameFilterType
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine, Inspector

from fswatch_sync.errors import FswatchSyncError
from fswatch_sync.schema import tool_metadata

VERSION_TABLE = "fswatch_sync_alembic_version"
BRANCH = "fswatch_sync"
SCRIPT_LOCATION = "fswatch_sync:migrations"
VERSION_LOCATION = "fswatch_sync:migrations/versions"

TOOL_TABLES = frozenset(tool_metadata.tables)


class MigrationError(FswatchSyncError):
    """The database's layout cannot be brought to head automatically."""


def include_tool_tables(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """Alembic ``include_name`` hook that keeps only the tool's tables (for this history)."""
    if type_ == "table":
        return name in TOOL_TABLES
    return True


def only_for_dialect(dialect: str) -> Callable[..., bool]:
    """Alembic ``include_object`` hook: leave out what ``tool_metadata`` creates only on other
    dialects (``Index(...).ddl_if(dialect=...)``), which autogenerate does not consult and would
    report as missing there."""

    def include_object(
        obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
    ) -> bool:
        # SQLAlchemy keeps ddl_if's condition as _ddl_if; there is no public accessor.
        rule = getattr(obj, "_ddl_if", None)
        if reflected or rule is None or rule.dialect is None:
            return True
        dialects = (rule.dialect,) if isinstance(rule.dialect, str) else tuple(rule.dialect)
        return dialect in dialects

    return include_object


def exclude_tool_tables(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """Alembic ``include_name`` hook for a *host's* env.py: autogenerate then neither proposes
    to drop the tool's tables nor to create them in the host's history."""
    if type_ == "table":
        return name not in TOOL_TABLES and name != VERSION_TABLE
    return True


def _index_names(inspector: Inspector, table: str) -> set[str]:
    if not inspector.has_table(table):
        return set()
    return {str(index["name"]) for index in inspector.get_indexes(table)}


_RELEASED_TABLES = (
    "fswatch_sync_journal",
    "fswatch_sync_sweeps",
    "fswatch_sync_instances",
    "fswatch_sync_leases",
)

# Newest first: how a database whose tables were made by ``create_all`` (``init-db``, or a service
# or command at start) without a recorded revision shows that it already has a revision's layout.
# A marker must be something ``create_all`` on an older layout does not add: it never alters an
# existing table, so a new index or column on an existing table is the safe sign; a new table
# alone is not (a newer version's start-up may have created it beside an old journal).
def _has_0003_layout(inspector: Inspector) -> bool:
    # 0002's index by app is gone (0003 has a partial one, and none on MariaDB).
    journal = _index_names(inspector, "fswatch_sync_journal")
    return (
        "ix_fswatch_sync_journal_batch" in journal
        and "ix_fswatch_sync_journal_app" not in journal
    )


LAYOUT_MARKERS: tuple[tuple[str, Callable[[Inspector], bool]], ...] = (
    (
        # 0004 only adds a table, which a start-up may have made beside an older journal: it
        # counts only on top of 0003's layout (0004 creates the table when it is absent).
        "0004",
        lambda inspector: inspector.has_table("fswatch_sync_tree") and _has_0003_layout(inspector),
    ),
    ("0003", _has_0003_layout),
    (
        "0002",
        lambda inspector: "ix_fswatch_sync_journal_batch"
        in _index_names(inspector, "fswatch_sync_journal"),
    ),
    ("0001", lambda inspector: all(inspector.has_table(t) for t in _RELEASED_TABLES)),
)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for this history; with ``connection``, env.py runs on it."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("version_table", VERSION_TABLE)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    found = script_directory().get_current_head()
    assert found is not None
    return found


def current(connection: Connection) -> str | None:
    """The recorded revision, or None when the database has none."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def detect_unversioned(connection: Connection) -> str | None:
    """The revision whose layout the tool's tables have, when no revision is recorded; None
    when there are no tool tables at all. MigrationError for a partial layout."""
    inspector = sa.inspect(connection)
    present = TOOL_TABLES & set(inspector.get_table_names())
    if not present:
        return None
    for revision, marker in LAYOUT_MARKERS:
        if marker(inspector):
            return revision
    raise MigrationError(
        f"the tool's tables are incomplete ({', '.join(sorted(present))}) and carry no revision"
        f" in {VERSION_TABLE}; drop them or stamp the right revision by hand"
        f" (alembic stamp), then upgrade"
    )


@dataclass(frozen=True)
class UpgradeResult:
    before: str | None  # the recorded revision before, or None
    detected: str | None  # the layout recognised on an unversioned database, or None
    after: str

    @property
    def changed(self) -> bool:
        return (self.detected or self.before) != self.after


def upgrade(target: Engine | Connection, revision: str = "head") -> UpgradeResult:
    """Bring the tool's tables to ``revision``: a fresh database gets the whole history; tables
    made by ``create_all`` without a recorded revision are recognised, stamped, and upgraded."""
    if isinstance(target, Engine):
        with target.begin() as connection:
            return _upgrade(connection, revision)
    return _upgrade(target, revision)


def _upgrade(connection: Connection, revision: str) -> UpgradeResult:
    # A MigrationContext of its own rather than alembic.command: the command machinery installs
    # module-wide proxies (alembic.context) that a host's env.py, still running around this call,
    # would lose.
    script = script_directory()
    context = MigrationContext.configure(
        connection,
        opts={
            "version_table": VERSION_TABLE,
            "target_metadata": tool_metadata,
            "fn": lambda heads, _context: script._upgrade_revs(revision, heads),
        },
    )
    before = context.get_current_revision()
    detected = None
    if before is None:
        detected = detect_unversioned(connection)
        if detected is not None:
            context.stamp(script, detected)
    with Operations.context(context):
        context.run_migrations()
    after = context.get_current_revision()
    assert after is not None
    return UpgradeResult(before=before, detected=detected, after=after)


def compare(connection: Connection) -> list[Any]:
    """What autogenerate sees between the database and ``tool_metadata`` (empty: no drift)."""
    from alembic.autogenerate import compare_metadata

    context = MigrationContext.configure(
        connection,
        opts={
            "version_table": VERSION_TABLE,
            "include_name": include_tool_tables,
            "include_object": only_for_dialect(connection.dialect.name),
            "compare_type": True,
            "target_metadata": tool_metadata,
        },
    )
    return list(compare_metadata(context, tool_metadata))
