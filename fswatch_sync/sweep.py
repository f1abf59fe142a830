"""The full reconciliation pass: orphan apps, orphan tasks, stuck tasks, old tasks — in that order.

Planning (which rows are orphans, what the guard says, which tasks are stuck) is pure and takes
``now``; applying goes through the store, which re-checks every condition under lock. A dry run
plans exactly as a real run would, including the removal's own checks, and changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import sqlalchemy as sa

from fswatch_sync import announce, db, signals
from fswatch_sync.errors import SweepRefused
from fswatch_sync.layout import AppKey, Scan, app_exists, root_present, scan_tree
from fswatch_sync.records import Lease, SweepLog
from fswatch_sync.settings import Settings
from fswatch_sync.store import ActiveTask, AppRow, RemovalOutcome, Store, TaskChange

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class SweepReport:
    """What one sweep did (or, in a dry run, would do)."""

    dry_run: bool = False
    forced: bool = False
    orphan_apps: int = 0
    orphan_tasks: int = 0
    stuck_tasks: int = 0
    old_tasks: int = 0
    journal_pruned: int = 0
    stuck_running: int = 0
    stuck_pending: int = 0
    blocked_apps: int = 0
    kept_present: int = 0
    app_rows: int = 0
    app_dirs: int = 0
    unreadable_dirs: int = 0
    refused: str | None = None
    started_at: datetime | None = None
    duration_seconds: float = 0.0
    removed: list[AppKey] = field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        return {
            "orphan_apps": self.orphan_apps,
            "orphan_tasks": self.orphan_tasks,
            "stuck_tasks": self.stuck_tasks,
            "old_tasks": self.old_tasks,
            "blocked_apps": self.blocked_apps,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.counts(),
            "dry_run": self.dry_run,
            "forced": self.forced,
            "refused": self.refused is not None,
            "reason": self.refused,
            "stuck_running": self.stuck_running,
            "stuck_pending": self.stuck_pending,
            "journal_pruned": self.journal_pruned,
            "kept_present": self.kept_present,
            "app_rows": self.app_rows,
            "app_dirs": self.app_dirs,
            "unreadable_dirs": self.unreadable_dirs,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "duration_seconds": round(self.duration_seconds, 3),
        }


# -- pure planning ---------------------------------------------------------------------------


def orphan_candidates(
    present: set[AppKey],
    rows: Iterable[AppRow],
    now: datetime,
    grace: timedelta,
    unknown_slugs: Iterable[str] = (),
) -> list[AppKey]:
    """App rows without a directory, except rows younger than the grace (NULL counts as old)
    and rows in a model directory that could not be listed (absence not proven)."""
    young_after = now - grace
    unknown = frozenset(unknown_slugs)
    return sorted(
        row.key
        for row in rows
        if row.key not in present
        and row.key.model_slug not in unknown
        and (row.created_at is None or row.created_at <= young_after)
    )


def guard(
    *,
    root_ok: bool,
    dirs: int,
    rows: int,
    orphans: int,
    max_fraction: float,
    force: bool,
) -> str | None:
    """Why the sweep must not run now, or None. A missing root is refused even when forced."""
    if not root_ok:
        return "the root is missing (not mounted?); nothing was changed"
    if force:
        return None
    if dirs == 0 and rows > 0:
        return f"the root holds no app directory while {rows} app rows exist; nothing was changed"
    if rows and orphans > max_fraction * rows:
        return (
            f"{orphans} of {rows} app rows ({orphans / rows:.0%}) have no directory, more than the"
            f" allowed {max_fraction:.0%}; nothing was changed (use --force to proceed)"
        )
    return None


@dataclass(frozen=True)
class TaskPlan:
    orphans: list[Any]
    stuck_running: list[Any]
    stuck_pending: list[Any]


def _age_start(task: ActiveTask) -> datetime | None:
    return task.started_at or task.created_at


def classify_tasks(
    tasks: Iterable[ActiveTask],
    *,
    removed: set[AppKey],
    now: datetime,
    running_timeout: timedelta,
    pending_timeout: timedelta,
    running: str,
    pending: str,
    orphan_pass: bool = True,
) -> TaskPlan:
    """Sort active tasks into orphans (no app row) and stuck ones; a task is in one list only.

    A running task is aged by ``started_at`` (``created_at`` when that is NULL); a pending one by
    ``created_at``; a task with no timestamp to age it by is never judged stuck. The tasks of
    ``removed`` apps are orphans whatever the switches (the removal cancels them); with the
    orphan-tasks pass switched off, a task without an app row is judged by the stuck rules.
    """
    orphans, stuck_running, stuck_pending = [], [], []
    for task in tasks:
        if task.key in removed or (orphan_pass and not task.has_app):
            orphans.append(task.pk)
        elif task.status == running:
            start = _age_start(task)
            if start is not None and start < now - running_timeout:
                stuck_running.append(task.pk)
        elif (
            task.status == pending
            and task.created_at is not None
            and task.created_at < now - pending_timeout
        ):
            stuck_pending.append(task.pk)
    return TaskPlan(orphans, stuck_running, stuck_pending)


# -- running a sweep -------------------------------------------------------------------------


class Sweeper:
    """Runs sweeps for one store and one set of settings."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        instance_id: str,
        sender: Any = None,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.instance_id = instance_id
        self.sender = self if sender is None else sender
        self.progress = progress
        self.sweep_log = SweepLog(store.engine, instance_id)
        self.lease = Lease(
            store.engine, instance_id, duration_seconds=settings.lease_seconds
        )

    def run(
        self,
        *,
        now: datetime | None = None,
        dry_run: bool = False,
        force: bool = False,
        trigger: str = "manual",
    ) -> SweepReport:
        """One full pass. Raises SweepRefused (nothing changed) or LeaseUnavailable."""
        # The lease first: taking it may wait for the previous holder's last transaction, and
        # the recorded started_at must not precede the moment this sweep held the lease.
        # A dry run changes nothing, not even the tool's own bookkeeping: no lease, no history.
        if not dry_run:
            self.lease.acquire_or_raise()
        # Every age is judged against ``now``; a naive value is read as UTC, like the database's.
        moment = db.utcnow() if now is None else db.from_db_time(now)
        assert moment is not None
        clock = time.monotonic()
        report = SweepReport(dry_run=dry_run, forced=force, started_at=moment)
        try:
            signals.send(signals.sweep_started, self.sender, trigger=trigger, dry_run=dry_run)
            sweep_id = None if dry_run else self.sweep_log.started(
                trigger=trigger, dry_run=dry_run, forced=force, now=moment
            )
            outcome, message = "failed", None
            try:
                self._passes(report, moment, dry_run=dry_run, force=force)
                outcome = "ok"
            except SweepRefused as exc:
                outcome, message = "refused", str(exc)
                report.refused = str(exc)
                raise
            except Exception as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise
            finally:
                report.duration_seconds = time.monotonic() - clock
                if sweep_id is not None:
                    self.sweep_log.finished(
                        sweep_id, outcome=outcome, counts=report.counts(), message=message,
                        now=db.utcnow(),
                    )
                signals.send(signals.sweep_finished, self.sender, report=report)
        finally:
            if not dry_run:
                self.lease.release()
        log.info(
            "sweep %s: orphan_apps=%d orphan_tasks=%d stuck_tasks=%d old_tasks=%d blocked=%d"
            " in %.2fs",
            "(dry run)" if dry_run else "done",
            report.orphan_apps,
            report.orphan_tasks,
            report.stuck_tasks,
            report.old_tasks,
            report.blocked_apps,
            report.duration_seconds,
        )
        return report

    def _passes(self, report: SweepReport, now: datetime, *, dry_run: bool, force: bool) -> None:
        settings, store = self.settings, self.store.with_commit_check(self.lease.check_and_extend)
        root = settings.root
        root_ok = root_present(root, settings.root_marker)
        scan = scan_tree(root) if root_ok else Scan(set(), frozenset(), root_listed=False)
        # A root that cannot be listed tells nothing about any app: treated as missing.
        root_ok = root_ok and scan.root_listed
        present = scan.present
        if scan.unreadable:
            log.warning(
                "%d model directories could not be listed; their apps are left alone: %s",
                len(scan.unreadable),
                ", ".join(sorted(scan.unreadable)[:5]),
            )
        grace = timedelta(minutes=settings.app_grace_minutes)
        rows = store.app_rows(young_after=now - grace)
        report.app_rows, report.app_dirs = len(rows), len(present)
        report.unreadable_dirs = len(scan.unreadable)
        candidates = (
            orphan_candidates(present, rows, now, grace, scan.unreadable)
            if settings.cleanup_orphan_apps
            else []
        )
        refusal = guard(
            root_ok=root_ok,
            dirs=len(present),
            rows=len(rows),
            orphans=len(candidates),
            max_fraction=settings.max_delete_fraction,
            force=force,
        )
        if refusal is not None:
            if not root_ok:
                # A path with a newline (or bytes that are not UTF-8) is quoted: one line.
                shown = str(root) if str(root).isprintable() else repr(str(root))
                refusal = f"{shown}: {refusal}"
            log.warning("sweep refused: %s", refusal)
            raise SweepRefused(refusal)
        # Scanning wrote nothing, so no commit renewed the lease meanwhile.
        if not dry_run:
            self.lease.renew()

        removal = RemovalOutcome()
        if candidates:
            removal = self._in_steps(
                "orphan apps",
                candidates,
                partial(
                    store.remove_apps,
                    source="sweep",
                    now=now,
                    still_absent=lambda key: not app_exists(root, key),
                    dry_run=dry_run,
                ),
            )
            if not dry_run:
                announce.removal(self.sender, removal, "sweep")
        report.orphan_apps = len(removal.removed)
        report.blocked_apps = len(removal.blocked)
        report.kept_present = len(removal.present)
        report.removed = removal.removed
        report.orphan_tasks = len(removal.cancelled)

        statuses = store.config.statuses
        running_cutoff = now - timedelta(minutes=settings.running_timeout_minutes)
        pending_cutoff = now - timedelta(minutes=settings.pending_timeout_minutes)
        # A real run reads only the tasks some rule may apply to (each batch re-checks its rule
        # under lock anyway); a dry run also needs the tasks of the apps it would remove.
        active = store.active_tasks(
            None
            if dry_run
            else sa.or_(
                _orphan_condition(store),
                _stuck_running_condition(store, running_cutoff),
                _stuck_pending_condition(store, pending_cutoff),
            )
        )
        if not dry_run:
            self.lease.renew()
        plan = classify_tasks(
            active,
            removed=set(removal.removed) if dry_run else set(),
            now=now,
            running_timeout=now - running_cutoff,
            pending_timeout=now - pending_cutoff,
            running=statuses.running,
            pending=statuses.pending,
            orphan_pass=settings.cleanup_orphan_tasks,
        )
        if dry_run:
            # Tasks the removal would cancel are already counted above.
            cancelled = {change.pk for change in removal.cancelled}
            plan = TaskPlan(
                [pk for pk in plan.orphans if pk not in cancelled],
                plan.stuck_running,
                plan.stuck_pending,
            )
        if settings.cleanup_orphan_tasks:
            report.orphan_tasks += self._change(
                store, plan.orphans, "orphan tasks", dry_run,
                still=_orphan_condition(store), new_status=statuses.cancelled,
                message="cancelled: target app is gone (it has no row any more)",
                reason="orphan", now=now,
            )
        if settings.cleanup_stuck_tasks:
            report.stuck_running = self._change(
                store, plan.stuck_running, "stuck running tasks", dry_run,
                still=_stuck_running_condition(store, running_cutoff),
                new_status=statuses.failed,
                message=(
                    f"failed: still running after {settings.running_timeout_minutes:g} minutes"
                ),
                reason="stuck_running", now=now, failed=True,
            )
            report.stuck_pending = self._change(
                store, plan.stuck_pending, "stuck pending tasks", dry_run,
                still=_stuck_pending_condition(store, pending_cutoff),
                new_status=statuses.cancelled,
                message=(
                    f"cancelled: still pending after {settings.pending_timeout_minutes:g} minutes"
                ),
                reason="stuck_pending", now=now,
            )
            report.stuck_tasks = report.stuck_running + report.stuck_pending
        if settings.cleanup_old_tasks:
            cutoff = now - timedelta(days=settings.task_retention_days)
            if dry_run:
                report.old_tasks = store.count_old_tasks(cutoff)
            else:
                self._report_progress("old tasks", 0, 0)
                report.old_tasks = store.purge_old_tasks(cutoff, source="sweep", now=now)
                if report.old_tasks:
                    signals.send(
                        signals.tasks_purged, self.sender, count=report.old_tasks, cutoff=cutoff
                    )
        if settings.journal_retention_days > 0:
            # Housekeeping after the four passes: the journal would otherwise grow by a row per
            # change for as long as the tool runs.
            cutoff = now - timedelta(days=settings.journal_retention_days)
            if dry_run:
                report.journal_pruned = store.count_journal_before(cutoff)
            else:
                self._report_progress("journal", 0, 0)
                report.journal_pruned = store.purge_journal(cutoff)

    def _change(
        self,
        store: Store,
        pks: Sequence[Any],
        label: str,
        dry_run: bool,
        *,
        still: sa.ColumnElement[bool],
        new_status: str,
        message: str,
        reason: str,
        now: datetime,
        failed: bool = False,
    ) -> int:
        if dry_run or not pks:
            return len(pks)
        changes: list[TaskChange] = self._in_steps(
            label,
            pks,
            partial(
                store.change_tasks,
                still=still,
                new_status=new_status,
                message=message,
                action="task_failed" if failed else "task_cancelled",
                source="sweep",
                now=now,
            ),
        )
        announce.task_changes(self.sender, changes, reason=reason, source="sweep", failed=failed)
        return len(changes)

    def _in_steps(
        self, label: str, items: Sequence[Any], apply: Callable[[Sequence[Any]], Any]
    ) -> Any:
        """Apply in steps of a few batches so that progress can be shown between them."""
        if self.progress is None:
            return apply(items)
        step = self.store.batch_size * 4
        combined: Any = None
        for start in range(0, len(items), step):
            self._report_progress(label, start, len(items))
            part = apply(items[start : start + step])
            if combined is None:
                combined = part
            elif isinstance(part, RemovalOutcome):
                combined.extend(part)
            else:
                combined += part
        self._report_progress(label, len(items), len(items))
        return combined if combined is not None else apply([])

    def _report_progress(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)


def _orphan_condition(store: Store) -> sa.ColumnElement[bool]:
    host = store.host
    return sa.and_(
        host.task_col("status").in_(store.config.statuses.active),
        ~sa.exists().where(
            host.app_col("model_slug") == host.task_col("target_model"),
            host.app_col("app_number") == host.task_col("target_app_number"),
        ),
    )


def _stuck_running_condition(store: Store, cutoff: datetime) -> sa.ColumnElement[bool]:
    host = store.host
    started = sa.func.coalesce(host.task_col("started_at"), host.task_col("created_at"))
    return sa.and_(
        host.task_col("status") == store.config.statuses.running,
        started < db.to_db_time(cutoff),
    )


def _stuck_pending_condition(store: Store, cutoff: datetime) -> sa.ColumnElement[bool]:
    host = store.host
    return sa.and_(
        host.task_col("status") == store.config.statuses.pending,
        host.task_col("created_at") < db.to_db_time(cutoff),
    )
