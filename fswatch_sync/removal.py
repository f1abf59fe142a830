"""The app rule applied to keys: the one way an app's rows go, with their tasks and dependents.

All rows of a key go together (versions share one directory), with the key's active tasks and
whatever points at the rows, in one transaction per batch of keys. The keys come from the
reactor (removals the operating system reported) or the sweep (rows without a directory, past
the new-app grace, which the rule's predicate judges in SQL under lock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from fswatch_sync import db, rules
from fswatch_sync.batching import BatchSizer
from fswatch_sync.changes import TaskEdit, change_tasks, follow_policy
from fswatch_sync.images import JournalWriter
from fswatch_sync.layout import AppKey
from fswatch_sync.marks import Marks
from fswatch_sync.outcomes import RemovalOutcome
from fswatch_sync.rules import app_keys, task_keys
from fswatch_sync.store import Store
from fswatch_sync.text import first_line

log = logging.getLogger(__name__)

# Which of these keys have their directory (back) on disk now.
PresentNow = Callable[[list[AppKey]], Collection[AppKey]]


def remove_apps(
    store: Store,
    keys: Iterable[AppKey],
    *,
    source: str,
    now: datetime,
    present_now: PresentNow | None = None,
    dry_run: bool = False,
    young_after: datetime | None = None,
    missing_grace: timedelta | None = None,
    cancel_when_missing: bool = True,
    collect: bool = True,
    isolate: bool = False,
) -> RemovalOutcome:
    """Remove every row of each key, and cancel the key's active tasks, a batch per transaction.

    ``present_now`` is asked about the batch's keys after their rows are locked and before
    anything changes: a key whose directory is back keeps its rows (reported in ``present``).
    ``young_after``: keys with a row created after it are left alone (the sweep's grace).
    ``missing_grace``: keys are first marked missing, and removed once marked that long.
    ``dry_run``: the same statements, rolled back. ``collect``: list each cancelled task (for
    signals); otherwise only counted, and no task row passes through Python. ``isolate``: a
    batch the database refuses for a reason other than a transient one is halved until the key
    it refuses stands alone; that key is reported in ``failed`` and the others go on (the sweep;
    the reactor retries such a key itself).
    """
    options: dict[str, Any] = {
        "source": source,
        "now": now,
        "present_now": present_now,
        "young_after": young_after,
        "missing_grace": missing_grace,
        "cancel_when_missing": cancel_when_missing,
        "collect": collect,
    }
    if dry_run:
        with store.rehearsal() as rehearsal:
            return _remove(rehearsal, sorted(set(keys)), options, isolate)
    return _remove(store, sorted(set(keys)), options, isolate)


def _remove(
    store: Store, ordered: list[AppKey], options: dict[str, Any], isolate: bool
) -> RemovalOutcome:
    outcome = RemovalOutcome()
    batch = store._retry(_remove_batch)
    sizer = BatchSizer(store.batch_size, store.max_transaction_ms / 1000)
    start = 0
    while start < len(ordered):
        part = ordered[start : start + sizer.size]
        clock = time.monotonic()
        done = _isolating(store, batch, part, options) if isolate else batch(store, part, **options)
        # The batch is sized in keys, so its time is recorded per key (with all it carried).
        sizer.record(len(part), time.monotonic() - clock)
        outcome.extend(done)
        start += len(part)
    return outcome


def _isolating(
    store: Store, batch: Any, part: list[AppKey], options: dict[str, Any]
) -> RemovalOutcome:
    """``batch`` on ``part``; a refusal that is not transient is narrowed down by halving."""
    try:
        done: RemovalOutcome = batch(store, part, **options)
        return done
    except DBAPIError as exc:
        if db.is_transient(exc):
            raise
        if len(part) == 1:
            log.warning(
                "app %s left for the next sweep: the database refused its removal: %s",
                part[0],
                first_line(exc),
            )
            return RemovalOutcome(failed=[part[0]])
    middle = len(part) // 2
    outcome = _isolating(store, batch, part[:middle], options)
    outcome.extend(_isolating(store, batch, part[middle:], options))
    return outcome


def _remove_batch(
    store: Store,
    keys: list[AppKey],
    *,
    source: str,
    now: datetime,
    present_now: PresentNow | None,
    young_after: datetime | None,
    missing_grace: timedelta | None,
    cancel_when_missing: bool,
    collect: bool,
) -> RemovalOutcome:
    host, outcome = store.host, RemovalOutcome()
    id_col = host.app_col("id")
    slug_col, number_col = host.app_col("model_slug"), host.app_col("app_number")
    with store._write() as connection:
        where = rules.app_rule(host, keys, young_after)
        rows = connection.execute(
            store.locked(sa.select(id_col, slug_col, number_col).where(where), connection)
        ).all()
        ids_by_key: dict[AppKey, list[Any]] = {}
        for pk, slug, number in rows:
            ids_by_key.setdefault(AppKey(slug, int(number)), []).append(pk)
        if present_now is not None and ids_by_key:
            back = set(present_now(sorted(ids_by_key)))
            for key in sorted(back.intersection(ids_by_key)):
                outcome.present.append(key)
                del ids_by_key[key]
        # Restricting tables first: an app they hold is left entirely untouched (not even
        # marked missing), whatever else would happen to it.
        for dependent in host.dependents:
            if dependent.policy != "restrict" or not ids_by_key:
                continue
            blocked = _pointed_at_keys(connection, dependent, ids_by_key)
            if blocked:
                log.warning(
                    "%d app(s) kept: rows in %s point at them and its policy is restrict (%s)",
                    len(blocked),
                    dependent.name,
                    ", ".join(str(k) for k in blocked[:5]),
                )
            for key in blocked:
                del ids_by_key[key]
                outcome.blocked.append(key)
        journal = JournalWriter(connection, source=source, now=now)
        if missing_grace is not None:
            ids_by_key = _mark_or_due(
                store, connection, ids_by_key, outcome, journal, now,
                missing_grace=missing_grace, cancel=cancel_when_missing, collect=collect,
            )
        if not ids_by_key:
            return outcome
        removing = sorted(ids_by_key)
        chosen = db.one_of(id_col, [pk for key in removing for pk in ids_by_key[key]])
        for dependent in host.dependents:
            if dependent.policy == "restrict":
                continue
            count = follow_policy(
                connection, dependent, host.apps, chosen, journal, (slug_col, number_col)
            )
            if dependent.policy == "delete":
                outcome.dependents_deleted += count
            else:
                outcome.dependents_nullified += count
        _cancel_tasks(store, connection, removing, journal, now, outcome, collect)
        journalled = journal.record("app_removed", host.apps, chosen, key=(slug_col, number_col))
        deleted = connection.execute(sa.delete(host.apps).where(chosen)).rowcount
        if deleted != journalled:
            raise db.StaleRead(f"{journalled - deleted} app row(s) changed under the tool's lock")
        if missing_grace is not None:
            Marks(host).clear(connection, removing)
        outcome.removed = removing
        outcome.removed_rows = int(deleted)
    return outcome


def _mark_or_due(
    store: Store,
    connection: Connection,
    ids_by_key: dict[AppKey, list[Any]],
    outcome: RemovalOutcome,
    journal: JournalWriter,
    now: datetime,
    *,
    missing_grace: timedelta,
    cancel: bool,
    collect: bool,
) -> dict[AppKey, list[Any]]:
    """The missing-since grace: mark the keys found missing for the first time (journalled
    before the mark is written, their active tasks cancelled when ``cancel``), clear the marks
    of keys that are back, and return the keys marked longer ago than the grace."""
    host = store.host
    marks = Marks(host)
    marks.clear(connection, outcome.present)
    found = marks.read(connection, ids_by_key)
    fresh = sorted(key for key in ids_by_key if key not in found)
    if fresh:
        journal.record(
            "app_marked_missing",
            host.apps,
            app_keys(host, fresh),
            key=(host.app_col("model_slug"), host.app_col("app_number")),
        )
        marks.mark(connection, fresh, now)
        outcome.marked = fresh
        if cancel:
            _cancel_tasks(store, connection, fresh, journal, now, outcome, collect)
    due = now - missing_grace
    return {key: ids for key, ids in ids_by_key.items() if key in found and found[key] <= due}


def _cancel_tasks(
    store: Store,
    connection: Connection,
    keys: list[AppKey],
    journal: JournalWriter,
    now: datetime,
    outcome: RemovalOutcome,
    collect: bool,
) -> None:
    """Cancel the keys' active tasks: journalled, compare-and-set on the status."""
    host = store.host
    effect = rules.SetStatus(
        host.config.statuses.cancelled, rules.key_message(host.config.cancel_message, host)
    )
    matching = sa.and_(task_keys(host, keys), rules.active(host, by_status_index=False))
    edit = TaskEdit(matching, effect, "task_cancelled", now)
    count, changes = change_tasks(store, connection, edit, journal, collect=collect)
    outcome.cancelled += changes
    outcome.cancelled_count += count


def _pointed_at_keys(
    connection: Connection, dependent: Any, ids_by_key: dict[AppKey, list[Any]]
) -> list[AppKey]:
    """The keys some of whose rows ``dependent``'s rows point at."""
    host_apps = dependent.references[0].table
    on = sa.and_(
        *(
            column == reference
            for column, reference in zip(dependent.columns, dependent.references, strict=True)
        )
    )
    id_col = next(iter(host_apps.primary_key.columns))
    all_ids = [pk for ids in ids_by_key.values() for pk in ids]
    found = {
        pk
        for (pk,) in connection.execute(
            sa.select(id_col).select_from(host_apps.join(dependent.table, on))
            .where(db.one_of(id_col, all_ids))
            .distinct()
        )
    }
    return sorted(key for key, ids in ids_by_key.items() if found.intersection(ids))
