"""Reading the journal and undoing what it recorded.

A restore is all-or-nothing: it runs in one transaction and refuses, naming the first collision,
when putting a row back would clash with what exists now (a regenerated app's new row, a task the
runner has moved on since the tool changed it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from fswatch_sync import db, images
from fswatch_sync.errors import RestoreConflict
from fswatch_sync.schema import journal_table
from fswatch_sync.store import Store

RESTORABLE = (
    "app_removed",
    "task_cancelled",
    "task_failed",
    "task_purged",
    "dependent_deleted",
    "dependent_nullified",
    "task_dependent_deleted",
    "task_dependent_nullified",
)
# Rows go back parents first, so foreign keys from dependents and sub-tasks hold.
_INSERT_ORDER = {
    "app_removed": 0,
    "dependent_deleted": 1,
    "task_purged": 2,
    "task_dependent_deleted": 3,
}
_INSERTED = ("app_removed", "task_purged", "dependent_deleted", "task_dependent_deleted")


@dataclass(frozen=True)
class Selection:
    ids: tuple[int, ...] = ()
    batch_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    app: tuple[str, int] | None = None
    action: str | None = None
    include_restored: bool = False


def _where(selection: Selection) -> list[sa.ColumnElement[bool]]:
    j = journal_table.c
    clauses: list[sa.ColumnElement[bool]] = []
    if selection.ids:
        clauses.append(j.id.in_(selection.ids))
    if selection.batch_id:
        clauses.append(j.batch_id == selection.batch_id)
    if selection.since:
        clauses.append(j.at >= db.to_db_time(selection.since))
    if selection.until:
        clauses.append(j.at <= db.to_db_time(selection.until))
    if selection.app:
        clauses += [j.model_slug == selection.app[0], j.app_number == selection.app[1]]
    if selection.action:
        clauses.append(j.action == selection.action)
    if not selection.include_restored:
        clauses.append(j.restored_at.is_(None))
    return clauses


def list_entries(engine: Engine, selection: Selection, limit: int = 100) -> list[dict[str, Any]]:
    statement = (
        sa.select(journal_table)
        .where(*_where(selection))
        .order_by(journal_table.c.id.desc())
        .limit(limit)
    )
    with db.read_only(engine).connect() as connection:
        rows = connection.execute(statement).all()
    entries = []
    for row in rows:
        item = dict(row._mapping)
        for key in ("at", "restored_at"):
            moment = db.from_db_time(item[key])
            item[key] = moment.isoformat() if moment else None
        entries.append(item)
    return entries


def _pk_clause(table: Table, values: dict[str, Any]) -> sa.ColumnElement[bool]:
    return sa.and_(*(column == values[column.name] for column in table.primary_key.columns))


@dataclass
class RestoreResult:
    restored: int
    by_action: dict[str, int]


def restore(store: Store, selection: Selection, *, dry_run: bool = False) -> RestoreResult:
    """Undo the selected journal entries in one transaction, or refuse and change nothing."""
    if not (selection.ids or selection.batch_id or selection.since or selection.until):
        raise RestoreConflict("choose entries with --id, --batch or a time range (--since/--until)")
    host = store.host
    tables = {host.apps.name: host.apps, host.tasks.name: host.tasks}
    tables.update({d.table.name: d.table for d in (*host.dependents, *host.task_dependents)})
    selection = Selection(**{**selection.__dict__, "include_restored": False})

    def run() -> RestoreResult:
        with store.engine.connect() as connection, connection.begin() as trans:
            entries = connection.execute(
                sa.select(journal_table)
                .where(*_where(selection), journal_table.c.action.in_(RESTORABLE))
                .order_by(journal_table.c.id)
            ).all()
            if not entries:
                raise RestoreConflict("no restorable journal entries match")
            ordered = sorted(entries, key=lambda e: (_INSERT_ORDER.get(e.action, 4), -e.id))
            counts: dict[str, int] = {}
            # App keys whose rows this restore is putting back: a key's later rows (versions)
            # are not "a new row" of the same key.
            restoring: set[tuple[Any, Any]] = set()
            # App rows put back under a new id (SQLite had given the old one to another row):
            # old id -> new id, for the rows restored with them that point at it.
            moved: dict[Any, Any] = {}
            for entry in ordered:
                table = tables.get(entry.table_name)
                if table is None:
                    raise RestoreConflict(
                        f"journal entry {entry.id}: table {entry.table_name!r} is not mapped"
                    )
                _undo(connection, store, table, entry, restoring, moved)
                counts[entry.action] = counts.get(entry.action, 0) + 1
            if dry_run:
                trans.rollback()
            else:
                connection.execute(
                    sa.update(journal_table)
                    .where(journal_table.c.id.in_([e.id for e in entries]))
                    .values(restored_at=db.to_db_time(db.utcnow()))
                )
            return RestoreResult(len(entries), counts)

    return db.retrying(store.retry_seconds)(run)()


def _undo(
    connection: Connection,
    store: Store,
    table: Table,
    entry: Any,
    restoring: set[tuple[Any, Any]],
    moved: dict[Any, Any],
) -> None:
    image = _repoint(store, table, images.decode(table, entry.before_image), moved)
    where_pk = _pk_clause(table, image)
    # Locked as the store's own reads are: what is checked below cannot change before the write.
    current = connection.execute(
        store.locked(sa.select(table).where(where_pk), connection)
    ).first()
    host = store.host
    if entry.action == "app_removed" and current is not None and not _same_app(
        host, current, image
    ):
        # The id was given to another app since (SQLite reuses the largest deleted id): the
        # row goes back under a new id, and what is restored with it follows it there.
        pk = next(iter(table.primary_key.columns))
        values = {name: value for name, value in image.items() if name != pk.name}
        inserted = _execute(connection, sa.insert(table).values(values), entry, table)
        new_key = inserted.inserted_primary_key
        if new_key is None:
            raise RestoreConflict(
                f"journal entry {entry.id}: id {image[pk.name]!r} of {table.name} belongs to"
                " another app now and the database gave no new one"
            )
        moved[image[pk.name]] = new_key[0]
        restoring.add(
            (image[host.app_col("model_slug").name], image[host.app_col("app_number").name])
        )
        return
    if entry.action in _INSERTED:
        if current is not None:
            raise RestoreConflict(
                f"journal entry {entry.id}: a row with the same key is in {table.name} now"
            )
        if entry.action == "app_removed":
            slug, number = host.app_col("model_slug"), host.app_col("app_number")
            key = (image[slug.name], image[number.name])
            clash = None if key in restoring else connection.execute(
                sa.select(slug).where(slug == image[slug.name], number == image[number.name])
            ).first()
            if clash is not None:
                raise RestoreConflict(
                    f"journal entry {entry.id}: app {image[slug.name]}/app{image[number.name]}"
                    " has a new row now (regenerated?)"
                )
            restoring.add(key)
        if entry.action == "dependent_deleted":
            _require_apps(connection, store, table, image, entry)
        _execute(connection, sa.insert(table).values(image), entry, table)
        return
    if current is None:
        raise RestoreConflict(f"journal entry {entry.id}: the row is no longer in {table.name}")
    if entry.action in ("dependent_nullified", "task_dependent_nullified"):
        # Only the pointer the tool set to NULL goes back; the host may have changed the rest.
        pointers = {
            column.name
            for d in (*host.dependents, *host.task_dependents)
            if d.table.name == table.name and d.policy == "nullify"
            for column in d.columns
            if image.get(column.name) is not None
        }
        if not pointers:
            raise RestoreConflict(
                f"journal entry {entry.id}: no nullify policy for {table.name} any more"
            )
        for name in sorted(pointers):
            now_value = current._mapping[name]
            if now_value is not None and now_value != image[name]:
                raise RestoreConflict(
                    f"journal entry {entry.id}: {table.name}.{name} points at {now_value!r}"
                    " now; it moved on since"
                )
        _require_apps(connection, store, table, image, entry)
        _execute(
            connection,
            sa.update(table).where(where_pk).values({name: image[name] for name in pointers}),
            entry,
            table,
        )
        return
    status = host.task_col("status")
    if current._mapping[status] != entry.new_status:
        raise RestoreConflict(
            f"journal entry {entry.id}: task is {current._mapping[status]!r} now, not"
            f" {entry.new_status!r}; it moved on since"
        )
    if image.get(status.name) in store.config.statuses.active:
        # Re-activating a task whose app row the tool removed, without putting that row back,
        # would make the very orphan this tool exists to prevent. (A task that was an orphan
        # already, with no app_removed entry, simply goes back to what it was.)
        slug, number = host.app_col("model_slug"), host.app_col("app_number")
        target = (
            image[host.config.tasks.target_model], image[host.config.tasks.target_app_number]
        )
        j = journal_table.c
        if connection.execute(
            sa.select(slug).where(slug == target[0], number == target[1])
        ).first() is None and connection.execute(
            sa.select(j.id).where(
                # Written into the statement, so the partial index on app_removed serves it.
                j.action == sa.literal("app_removed", literal_execute=True),
                j.model_slug == target[0],
                j.app_number == target[1],
                j.restored_at.is_(None),
            ).limit(1)
        ).first() is not None:
            raise RestoreConflict(
                f"journal entry {entry.id}: app {target[0]}/app{target[1]} has no row; restore"
                " its app_removed entry with it (e.g. --batch)"
            )
    restored_columns = [
        name
        for name in (
            store.config.tasks.status,
            store.config.tasks.completed_at,
            store.config.tasks.error_message,
            store.config.tasks.updated_at,
        )
        if name
    ]
    reverted = connection.execute(
        sa.update(table)
        .where(where_pk, status == entry.new_status)
        .values({name: image.get(name) for name in restored_columns})
    )
    if reverted.rowcount != 1:
        raise RestoreConflict(f"journal entry {entry.id}: the task moved on during the restore")


def _require_apps(
    connection: Connection, store: Store, table: Table, image: dict[str, Any], entry: Any
) -> None:
    """A dependent row goes back only when the app row it points at is there."""
    for dependent in store.host.dependents:
        values = [image.get(column.name) for column in dependent.columns]
        if dependent.table.name != table.name or None in values:
            continue
        found = connection.execute(
            sa.select(*dependent.references).where(
                *(ref == value for ref, value in zip(dependent.references, values, strict=True))
            )
        ).first()
        if found is None:
            pointed = ", ".join(
                f"{ref.name}={value!r}"
                for ref, value in zip(dependent.references, values, strict=True)
            )
            raise RestoreConflict(
                f"journal entry {entry.id}: the {store.host.apps.name} row it points at"
                f" ({pointed}) is not there; restore its app_removed entry with it (e.g. --batch)"
            )


def _same_app(host: Any, current: Any, image: dict[str, Any]) -> bool:
    slug, number = host.app_col("model_slug"), host.app_col("app_number")
    return bool(
        current._mapping[slug] == image[slug.name]
        and current._mapping[number] == image[number.name]
    )


def _repoint(
    store: Store, table: Table, image: dict[str, Any], moved: dict[Any, Any]
) -> dict[str, Any]:
    """A dependent row's pointer to an app row that this restore put back under a new id."""
    if not moved:
        return image
    for dependent in store.host.dependents:
        if dependent.table.name != table.name or len(dependent.columns) != 1:
            continue
        if dependent.references[0].primary_key:
            name = dependent.columns[0].name
            if image.get(name) in moved:
                image = {**image, name: moved[image[name]]}
    return image


def _execute(connection: Connection, statement: Any, entry: Any, table: Table) -> Any:
    """Run a restoring write; a constraint it would break now is a conflict, not a crash."""
    try:
        return connection.execute(statement)
    except IntegrityError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "constraint"
        raise RestoreConflict(
            f"journal entry {entry.id}: putting the row back in {table.name} would break a"
            f" constraint now ({reason})"
        ) from None


def parse_ids(texts: Sequence[str]) -> tuple[int, ...]:
    ids: list[int] = []
    for text in texts:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, _, high = part.partition("-")
                ids.extend(range(int(low), int(high) + 1))
            elif part:
                ids.append(int(part))
    return tuple(ids)
