"""The journal's before-images: written by the database, read back by a restore.

One module holds both directions. Writing: :func:`image_of` is a SQL expression that renders a
whole row as JSON text on the database (``json_quote`` on SQLite, ``row_to_json`` on PostgreSQL,
``JSON_OBJECT`` on MariaDB/MySQL), so a batch journals its rows with one ``INSERT ... SELECT``
and no changed row passes through Python. Reading: :func:`decode` turns an image written by any
of the three back into the values its columns take.
"""

from __future__ import annotations

import json
import secrets
import time as clock
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import ColumnElement, FromClause, Table
from sqlalchemy.engine import Connection, Dialect

from fswatch_sync.db import to_db_time
from fswatch_sync.schema import journal_table


def _is_binary(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.LargeBinary | sa.types._Binary)


def _sqlite_value(column: sa.Column[Any]) -> ColumnElement[Any]:
    # json_quote renders NULL, numbers and text as JSON; it refuses a BLOB, so bytes go as hex.
    if _is_binary(column):
        return sa.func.json_quote(sa.func.hex(column))
    return sa.func.json_quote(column)


def image_of(table: Table, dialect: Dialect) -> ColumnElement[str]:
    """The row of ``table`` in the current FROM clause, as JSON text built by the database."""
    name = dialect.name
    if name == "postgresql":
        # Every column, whatever its type (enum, timestamptz, uuid, bytea as "\\x..." text).
        return sa.cast(sa.func.row_to_json(table.table_valued()), sa.Text())
    if name in ("mysql", "mariadb"):
        arguments: list[Any] = []
        for column in table.columns:
            value: Any = sa.func.hex(column) if _is_binary(column) else column
            arguments += [sa.literal(column.name, sa.String()), value]
        return sa.cast(sa.func.json_object(*arguments), sa.Text())
    # SQLite: a concatenation, not json_object, which takes at most 127 arguments (63 columns).
    pieces: list[ColumnElement[Any]] = []
    for index, column in enumerate(table.columns):
        head = ("{" if index == 0 else ",") + json.dumps(column.name) + ":"
        pieces += [sa.literal(head, sa.String()), _sqlite_value(column)]
    if not pieces:
        return sa.literal("{}", sa.String())
    pieces.append(sa.literal("}", sa.String()))
    expression = pieces[0]
    for piece in pieces[1:]:
        expression = expression.op("||")(piece)
    return sa.cast(expression, sa.Text())


def key_of(table: Table, dialect: Dialect) -> ColumnElement[str]:
    """The row's primary key as a JSON array (for display; a restore reads the image)."""
    columns = list(table.primary_key.columns)
    if dialect.name == "postgresql":
        return sa.cast(sa.func.json_build_array(*columns), sa.Text())
    if dialect.name in ("mysql", "mariadb"):
        return sa.cast(sa.func.json_array(*columns), sa.Text())
    return sa.cast(sa.func.json_array(*columns), sa.Text())


def _python_type(column_type: sa.types.TypeEngine[Any]) -> type | None:
    try:
        return column_type.python_type
    except NotImplementedError:
        return None


def _bytes(value: str) -> bytes:
    # PostgreSQL renders bytea as "\x0a0b"; the others as plain hex.
    return bytes.fromhex(value[2:] if value.startswith("\\x") else value)


def _moment(value: str) -> datetime:
    # MariaDB renders "2026-06-01 12:00:00.000000", PostgreSQL "2026-06-01T12:00:00+00:00":
    # both are ISO 8601 to fromisoformat.
    return datetime.fromisoformat(value)


def _boolean(value: Any) -> Any:
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return bool(value)
    return value


_CONVERTERS: dict[type, Any] = {
    datetime: lambda v: _moment(v) if isinstance(v, str) else v,
    date: lambda v: date.fromisoformat(v[:10]) if isinstance(v, str) else v,
    time: lambda v: time.fromisoformat(v) if isinstance(v, str) else v,
    timedelta: lambda v: timedelta(seconds=float(v)) if isinstance(v, int | float | Decimal) else v,
    Decimal: lambda v: Decimal(str(v)) if isinstance(v, str | int | float | Decimal) else v,
    float: lambda v: float(v) if isinstance(v, int | Decimal | str) else v,
    int: lambda v: int(v) if isinstance(v, Decimal | str) and not isinstance(v, bool) else v,
    uuid.UUID: lambda v: uuid.UUID(v) if isinstance(v, str) else v,
    bytes: lambda v: _bytes(v) if isinstance(v, str) else v,
    bool: _boolean,
}


def decode(table: Table, text: str) -> dict[str, Any]:
    """A before-image back into the values its columns take, by each column's Python type (so
    dialect types reflected from a host's database decode too: TIMESTAMP, INTERVAL, UUID...).
    Numbers are read as Decimal first, so no digit of a NUMERIC is lost on the way."""
    image = json.loads(text, parse_float=Decimal)
    values: dict[str, Any] = {}
    for name, value in image.items():
        if name not in table.c:
            continue
        kind = _python_type(table.c[name].type)
        converter = _CONVERTERS.get(kind) if kind is not None else None
        if value is None or converter is None:
            values[name] = float(value) if isinstance(value, Decimal) and kind is None else value
        else:
            values[name] = converter(value)
    return values


def new_batch_id() -> str:
    """A batch id that sorts by time (a UUID whose first 48 bits are the milliseconds, as UUIDv7
    lays them out): each batch's entries land at the end of the batch index instead of at a
    random page of it."""
    millis = clock.time_ns() // 1_000_000
    value = (
        (millis & (2**48 - 1)) << 80
        | 0x7 << 76
        | secrets.randbits(12) << 64
        | 0b10 << 62
        | secrets.randbits(62)
    )
    return str(uuid.UUID(int=value))


class JournalWriter:
    """Writes one transaction's journal entries with ``INSERT ... SELECT``: the database builds
    each before-image from the row itself, in the same statement that finds it."""

    def __init__(self, connection: Connection, *, source: str, now: datetime) -> None:
        self.connection = connection
        self.dialect = connection.dialect
        self.batch_id = new_batch_id()
        self.source = source
        self.at = to_db_time(now)
        self.count = 0

    def entry(
        self,
        action: str,
        table: Table,
        *,
        key: tuple[ColumnElement[Any], ColumnElement[Any]] | None = None,
        status: ColumnElement[Any] | None = None,
        new_status: str | None = None,
    ) -> list[ColumnElement[Any]]:
        """The journal columns (:data:`JOURNAL_COLUMNS`, in order) of the row of ``table`` in the
        current FROM clause, labelled by name. ``key``: the (slug, number) columns naming the
        row's app."""
        slug: ColumnElement[Any] = sa.null()
        number: ColumnElement[Any] = sa.null()
        if key is not None:
            slug = sa.cast(key[0], sa.Text())
            number = key[1]
            if not isinstance(number.type, sa.Integer):
                number = sa.cast(number, sa.BigInteger())
        values: list[ColumnElement[Any]] = [
            sa.literal(self.batch_id, sa.String()),
            sa.literal(self.at, sa.DateTime()),
            sa.literal(action, sa.String()),
            sa.literal(self.source, sa.String()),
            sa.literal(table.name, sa.String()),
            key_of(table, self.dialect),
            slug,
            number,
            sa.null() if status is None else sa.cast(status, sa.Text()),
            sa.null() if new_status is None else sa.literal(new_status, sa.Text()),
            image_of(table, self.dialect),
        ]
        return [value.label(name) for value, name in zip(values, JOURNAL_COLUMNS, strict=True)]

    def record(
        self,
        action: str,
        table: Table,
        where: ColumnElement[bool],
        *,
        from_: FromClause | None = None,
        key: tuple[ColumnElement[Any], ColumnElement[Any]] | None = None,
        status: ColumnElement[Any] | None = None,
        new_status: str | None = None,
    ) -> int:
        """Journal the rows of ``table`` (joined as ``from_``) for which ``where`` holds; return
        how many. ``key``: the (slug, number) columns naming each row's app."""
        source = (
            sa.select(*self.entry(action, table, key=key, status=status, new_status=new_status))
            .select_from(table if from_ is None else from_)
            .where(where)
        )
        # preserve_rowcount: psycopg reports an INSERT's row count only when asked to keep it.
        statement = (
            sa.insert(journal_table)
            .from_select(JOURNAL_COLUMNS, source)
            .execution_options(preserve_rowcount=True)
        )
        written = int(self.connection.execute(statement).rowcount)
        self.count += written
        return written


JOURNAL_COLUMNS = [
    "batch_id",
    "at",
    "action",
    "source",
    "table_name",
    "row_key",
    "model_slug",
    "app_number",
    "old_status",
    "new_status",
    "before_image",
]
