"""What the rules did: the values the store's changes return to the reactor, the sweep and the
signals (each changed task, a removal's outcome, a task rule's outcome), and an app key as the
sweep reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fswatch_sync.layout import AppKey


@dataclass(frozen=True)
class TaskChange:
    """One task whose status the tool changed (or, in a dry run, would change)."""

    pk: Any
    task_id: str
    key: AppKey
    old_status: str
    new_status: str


@dataclass
class RemovalOutcome:
    """What a call to :meth:`Store.remove_apps` did (counts are of keys unless named rows)."""

    removed: list[AppKey] = field(default_factory=list)
    removed_rows: int = 0
    # Every cancelled task is counted; each is listed only when asked for (signals).
    cancelled_count: int = 0
    cancelled: list[TaskChange] = field(default_factory=list)
    blocked: list[AppKey] = field(default_factory=list)
    present: list[AppKey] = field(default_factory=list)
    marked: list[AppKey] = field(default_factory=list)
    # Keys the database refused to change (a host constraint, a trigger): left for a later try.
    failed: list[AppKey] = field(default_factory=list)
    dependents_deleted: int = 0
    dependents_nullified: int = 0

    def extend(self, other: RemovalOutcome) -> None:
        self.removed += other.removed
        self.removed_rows += other.removed_rows
        self.cancelled_count += other.cancelled_count
        self.cancelled += other.cancelled
        self.blocked += other.blocked
        self.present += other.present
        self.marked += other.marked
        self.failed += other.failed
        self.dependents_deleted += other.dependents_deleted
        self.dependents_nullified += other.dependents_nullified


@dataclass
class RuleOutcome:
    """What one task rule did: how many rows, and each change when they were asked for."""

    name: str
    count: int = 0
    kept: int = 0
    # Rows the database refused to change (each isolated and skipped; the next sweep retries).
    failed: int = 0
    changes: list[TaskChange] = field(default_factory=list)


# One app key as the sweep reads it: (model_slug, app_number, its rows, 1 when a row is in the
# grace). A plain tuple: a sweep builds one per key, tens of thousands, and a named tuple costs
# twice as much to make.
AppRow = tuple[str, int, int, int]
