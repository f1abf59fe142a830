"""Missing-since marks: apps found missing while the missing-since grace is on.

A mark lives in the host's own column when the mapping names one (``apps_columns.missing_since``,
set on every row of the key), else in the tool's ``fswatch_sync_missing`` table (one row per
key). The removal rule marks a key the first time it finds it missing and removes it once the
mark is older than the grace; a directory that is back clears the mark.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fswatch_sync import db
from fswatch_sync.hostschema import HostTables
from fswatch_sync.layout import AppKey
from fswatch_sync.rules import app_keys, keys_clause
from fswatch_sync.schema import missing_table


class Marks:
    def __init__(self, host: HostTables) -> None:
        self.host = host
        name = host.config.apps.missing_since
        self.column = host.apps.c[name] if name else None

    def _tool_keys(self, keys: Iterable[AppKey]) -> sa.ColumnElement[bool]:
        return keys_clause(missing_table.c.model_slug, missing_table.c.app_number, keys)

    def read(self, connection: Connection, keys: Iterable[AppKey]) -> dict[AppKey, datetime]:
        """When each of ``keys`` was first found missing (keys not marked are absent)."""
        keys = list(keys)
        if not keys:
            return {}
        if self.column is not None:
            host = self.host
            slug, number = host.app_col("model_slug"), host.app_col("app_number")
            statement = (
                sa.select(slug, number, sa.func.min(self.column))
                .where(app_keys(host, keys), self.column.is_not(None))
                .group_by(slug, number)
            )
        else:
            table = missing_table.c
            statement = sa.select(table.model_slug, table.app_number, table.missing_since).where(
                self._tool_keys(keys)
            )
        marks: dict[AppKey, datetime] = {}
        for s, n, since in connection.execute(statement):
            moment = db.from_db_time(since)
            if moment is not None:
                marks[AppKey(s, int(n))] = moment
        return marks

    def mark(self, connection: Connection, keys: list[AppKey], now: datetime) -> None:
        if not keys:
            return
        if self.column is not None:
            values = {self.column.name: db.bind_time(self.column, now)}
            updated = self.host.config.apps.updated_at
            if updated:
                values[updated] = db.bind_time(self.host.apps.c[updated], now)
            connection.execute(
                sa.update(self.host.apps)
                .where(app_keys(self.host, keys), self.column.is_(None))
                .values(values)
            )
            return
        connection.execute(
            sa.insert(missing_table),
            [
                {"model_slug": k.model_slug, "app_number": k.app_number,
                 "missing_since": db.to_db_time(now)}
                for k in keys
            ],
        )

    def clear(self, connection: Connection, keys: Iterable[AppKey]) -> int:
        """Forget the marks of ``keys`` (their directory is back, or their rows are gone)."""
        keys = list(keys)
        if not keys:
            return 0
        if self.column is not None:
            result = connection.execute(
                sa.update(self.host.apps)
                .where(app_keys(self.host, keys), self.column.is_not(None))
                .values({self.column.name: None})
            )
        else:
            result = connection.execute(sa.delete(missing_table).where(self._tool_keys(keys)))
        return int(result.rowcount)

    def all_marked(self, connection: Connection) -> list[AppKey]:
        """Every marked key (few: a mark lasts only as long as the grace)."""
        if self.column is not None:
            host = self.host
            slug, number = host.app_col("model_slug"), host.app_col("app_number")
            statement = sa.select(slug, number).where(self.column.is_not(None)).distinct()
        else:
            statement = sa.select(missing_table.c.model_slug, missing_table.c.app_number)
        return sorted({AppKey(s, int(n)) for s, n in connection.execute(statement)})
