"""The host tables ``init-db`` creates when they are the tool's to manage (the embedded default,
or a ``[schema]`` mapping with ``manage_host_tables = true``): the apps and tasks tables, under
the table and column names the mapping gives.

Only their creation is declared here: at run time every host table, these included, is
reflected from the database (hostschema), so that columns the tool does not know are kept.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, MetaData, Table, UniqueConstraint
from sqlalchemy.sql.schema import SchemaItem
from sqlalchemy.types import DateTime, Integer, String, Text

from fswatch_sync.schemaconfig import SchemaConfig


def default_host_metadata(config: SchemaConfig) -> MetaData:
    """The embedded default host tables, as ``init-db`` creates them."""
    metadata = MetaData()
    apps, tasks = config.apps, config.tasks
    Table(
        config.apps_table,
        metadata,
        Column(apps.id, Integer, primary_key=True, autoincrement=True),
        Column(apps.model_slug, String(200), nullable=False),
        Column(apps.app_number, Integer, nullable=False),
        Column(apps.created_at, DateTime(), nullable=True),
        UniqueConstraint(apps.model_slug, apps.app_number),
    )
    task_columns: list[SchemaItem] = [
        Column(tasks.id, Integer, primary_key=True, autoincrement=True),
        Column(tasks.task_id, String(100), nullable=False, unique=True),
        Column(tasks.target_model, String(200), nullable=False),
        Column(tasks.target_app_number, Integer, nullable=False),
        Column(tasks.status, String(20), nullable=False),
        Column(tasks.created_at, DateTime(), nullable=True),
        Column(tasks.started_at, DateTime(), nullable=True),
        Column(tasks.completed_at, DateTime(), nullable=True),
    ]
    if tasks.error_message:
        task_columns.append(Column(tasks.error_message, Text, nullable=True))
    Table(
        config.tasks_table,
        metadata,
        *task_columns,
        # The sweep finds a target's tasks and the active/terminal sets through these.
        # Includes the status so that "the active tasks of these apps" is answered from the
        # index alone, without reading every finished task of each app.
        Index(
            f"ix_{config.tasks_table}_target",
            tasks.target_model,
            tasks.target_app_number,
            tasks.status,
        ),
        # With the key: a keyset batch of one status (stuck running, stuck pending) walks this
        # index in key order. (SQLite and InnoDB add the key to every index themselves;
        # PostgreSQL would otherwise walk the whole table by its primary key.)
        Index(f"ix_{config.tasks_table}_status", tasks.status, tasks.id),
    )
    return metadata
