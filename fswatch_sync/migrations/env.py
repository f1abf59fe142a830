"""Alembic environment for fswatch_sync's own tables.

Used by the ``alembic`` command line against this directory
(``alembic -c fswatch_sync/migrations/alembic.ini -x url=...``: ``revision --autogenerate``,
``check``, ``upgrade --sql``), and by ``alembic.command`` with the Config of
:func:`fswatch_sync.migrations.alembic_config` (which hands it a connection). ``fswatch-sync db
upgrade`` runs the same scripts without it. It only ever looks at the tool's tables, and keeps its
revision in ``fswatch_sync_alembic_version``, apart from the host's own Alembic history.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from fswatch_sync import db
from fswatch_sync.migrations import VERSION_TABLE, include_tool_tables, only_for_dialect
from fswatch_sync.schema import tool_metadata

config = context.config


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=tool_metadata,
        version_table=VERSION_TABLE,
        include_name=include_tool_tables,
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _run(connection: Connection) -> None:
    # SQLite alters a column only by copying its table: batch mode does that.
    _configure(
        connection=connection,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=only_for_dialect(connection.dialect.name),
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("fswatch_sync migrations: give the database as -x url=... ")
    return url


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)
    else:
        engine = db.create_engine(_url())
        try:
            with engine.connect() as connection:
                _run(connection)
        finally:
            engine.dispose()
