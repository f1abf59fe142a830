"""The full reconciliation pass: orphan apps, orphan tasks, stuck tasks, old tasks — in that order.

The sweep compares the tree with the app keys (the only comparison made in Python: the disk is
not in the database), asks the guard, then applies the rules of :mod:`fswatch_sync.rules` one
after another; every predicate is evaluated by the database, under lock, in the store's batches.
A dry run applies the very same rules in one transaction that it rolls back, so it reports
exactly what a real run would do.

This module runs the pass (:class:`Sweeper`); what it reports is :mod:`fswatch_sync.sweep_report`,
how it judges the tree :mod:`fswatch_sync.sweep_tree`, and its pure planning (the orphan keys,
the guard) :mod:`fswatch_sync.sweep_plan`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from fswatch_sync import announce, db, rules, signals, treehealth
from fswatch_sync.errors import SweepInterrupted, SweepRefused
from fswatch_sync.layout import apps_present
from fswatch_sync.outcomes import TaskChange
from fswatch_sync.records import Lease, SweepLog
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep_plan import guard, orphan_keys
from fswatch_sync.sweep_report import SweepReport
from fswatch_sync.sweep_tree import TreeJudge
from fswatch_sync.text import first_line
from fswatch_sync.treehealth import TreeRecord

# The sweep's public names, importable from here whichever module holds them.
__all__ = [
    "Progress",
    "SweepInterrupted",
    "SweepRefused",
    "SweepReport",
    "Sweeper",
    "guard",
    "orphan_keys",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


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
        known_root: Callable[[], treehealth.Identity | None] | None = None,
    ) -> None:
        self.store = store
        # One judge for every sweep: it remembers which untrusted models it has logged.
        self._judge_tree = TreeJudge(
            settings, TreeRecord(store.engine, settings.root), known_root
        ).judge
        self.settings = settings
        self.instance_id = instance_id
        self.sender = self if sender is None else sender
        self.progress = progress
        self.sweep_log = SweepLog(store.engine, instance_id)
        self.lease = Lease(
            store.engine, instance_id, duration_seconds=settings.lease_seconds
        )
        # Set by interrupt(): the running sweep stops at its next commit, rolled back.
        self.interrupted = threading.Event()
        self._current: int | None = None  # the sweeps row of the sweep in progress

    def interrupt(self) -> None:
        """Stop the sweep in progress (if any) before its next commit; see :meth:`abandon`."""
        self.interrupted.set()

    def abandon(self) -> None:
        """For a sweep that did not stop in time (a statement still waiting on the database):
        record it as interrupted and give the lease up now. Its thread can commit nothing
        more, since :meth:`interrupt` was called first."""
        sweep_id = self._current
        if sweep_id is not None:
            self.sweep_log.interrupted(sweep_id, now=db.utcnow())
            self.lease.release()

    def _commit_check(self, connection: Connection) -> None:
        if self.interrupted.is_set():
            raise SweepInterrupted("the sweep was interrupted (the instance is stopping)")
        self.lease.check_and_extend(connection)

    def _renew(self) -> None:
        if self.interrupted.is_set():
            raise SweepInterrupted("the sweep was interrupted (the instance is stopping)")
        self.lease.renew_if_due()

    def run(
        self,
        *,
        now: datetime | None = None,
        dry_run: bool = False,
        force: bool = False,
        trigger: str = "manual",
        allow_empty_root: bool = False,
        force_models: Iterable[str] = (),
    ) -> SweepReport:
        """One full pass. Raises SweepRefused (nothing changed), LeaseUnavailable, or
        SweepInterrupted (stopped part-way, each batch whole).

        ``force`` passes the mass-deletion fraction only; ``allow_empty_root`` an empty root;
        ``force_models`` the model directories named (see :mod:`fswatch_sync.treehealth`)."""
        if self.interrupted.is_set():
            raise SweepInterrupted("the sweep was interrupted (the instance is stopping)")
        # The lease first: taking it may wait for the previous holder's last transaction, and
        # the recorded started_at must not precede the moment this sweep held the lease.
        # A dry run changes nothing, not even the tool's own bookkeeping: no lease, no history.
        # The mapping is checked before anything else: one that cannot work changes nothing.
        self.store.validate()
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
            self._current = sweep_id
            outcome, message = "failed", None
            try:
                self._passes(
                    report, moment, dry_run=dry_run, force=force,
                    allow_empty_root=allow_empty_root, force_models=tuple(force_models),
                )
                outcome = "ok"
            except SweepInterrupted as exc:
                outcome, message = "interrupted", str(exc)
                raise
            except SweepRefused as exc:
                outcome, message = "refused", str(exc)
                report.refused = str(exc)
                exc.report = report  # what the guard saw, for the caller's --json
                raise
            except Exception as exc:
                message = first_line(exc)
                raise
            finally:
                self._current = None
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
            "sweep %s: orphan_apps=%d (%d rows) orphan_tasks=%d stuck_tasks=%d old_tasks=%d"
            " blocked=%d in %.2fs",
            "(dry run)" if dry_run else "done",
            report.orphan_apps,
            report.orphan_app_rows,
            report.orphan_tasks,
            report.stuck_tasks,
            report.old_tasks,
            report.blocked_apps,
            report.duration_seconds,
        )
        return report

    def _passes(
        self,
        report: SweepReport,
        now: datetime,
        *,
        dry_run: bool,
        force: bool,
        allow_empty_root: bool = False,
        force_models: tuple[str, ...] = (),
    ) -> None:
        if dry_run:
            with self.store.rehearsal() as rehearsal:
                self._apply(
                    rehearsal, report, now, force=force, live=False,
                    allow_empty_root=allow_empty_root, force_models=force_models,
                )
            return
        store = self.store.with_commit_check(self._commit_check).bulk()
        try:
            self._apply(
                store, report, now, force=force, live=True,
                allow_empty_root=allow_empty_root, force_models=force_models,
            )
        finally:
            store.end_bulk()

    def _apply(
        self,
        store: Store,
        report: SweepReport,
        now: datetime,
        *,
        force: bool,
        live: bool,
        allow_empty_root: bool = False,
        force_models: tuple[str, ...] = (),
    ) -> None:
        """Scan, guard, then every rule in order. ``live``: a real run (renews the lease
        between long steps and sends signals after each commit)."""
        settings = self.settings
        root = settings.root
        grace = timedelta(minutes=settings.app_grace_minutes)
        candidates, present = self._judge_tree(
            report, store, now, grace,
            live=live, force=force, allow_empty_root=allow_empty_root, force_models=force_models,
        )
        # Scanning wrote nothing, so no commit renewed the lease meanwhile.
        if live:
            self._renew()

        missing_grace = settings.missing_grace_minutes
        if missing_grace > 0:
            store.clear_marks_of(present)
        self._report_progress("orphan apps", 0, len(candidates))
        removal = store.remove_apps(
            candidates,
            source="sweep",
            now=now,
            present_now=lambda keys: apps_present(root, keys),
            young_after=now - grace,
            missing_grace=timedelta(minutes=missing_grace) if missing_grace > 0 else None,
            cancel_when_missing=settings.cancel_tasks_when_missing,
            isolate=True,
            collect=live
            and (
                signals.app_removed.has_receivers_for(self.sender)
                or signals.task_cancelled.has_receivers_for(self.sender)
            ),
        )
        if live:
            announce.removal(self.sender, removal, "sweep")
        report.orphan_apps = len(removal.removed)
        report.orphan_app_rows = removal.removed_rows
        report.marked_missing = len(removal.marked)
        report.failed_apps = len(removal.failed)
        report.blocked_apps = len(removal.blocked)
        report.kept_present = len(removal.present)
        report.dependents_deleted = removal.dependents_deleted
        report.dependents_nullified = removal.dependents_nullified
        report.removed = removal.removed
        report.orphan_tasks = removal.cancelled_count

        for rule in rules.task_rules(store.host, settings, now):
            if live:
                self._renew()
            self._report_progress(rule.name.replace("_", " "), 0, 0)
            per_change = live and isinstance(rule.effect, rules.SetStatus) and (
                rule.signal.has_receivers_for(self.sender)
            )
            outcome = store.apply_task_rule(rule, source="sweep", now=now, collect=per_change)
            self._record(report, rule, outcome.count, outcome.kept)
            report.failed_tasks += outcome.failed
            if live:
                self._announce(rule, outcome.changes, outcome.count, now)
        report.stuck_tasks = report.stuck_running + report.stuck_pending
        if settings.journal_retention_days > 0:
            # Housekeeping after the four passes: the journal would otherwise grow by a row per
            # change for as long as the tool runs.
            cutoff = now - timedelta(days=settings.journal_retention_days)
            self._report_progress("journal", 0, 0)
            report.journal_pruned = store.purge_journal(cutoff)

    @staticmethod
    def _record(report: SweepReport, rule: rules.TaskRule, count: int, kept: int) -> None:
        if rule.name == "orphan_tasks":
            report.orphan_tasks += count
        elif rule.name == "stuck_running":
            report.stuck_running = count
        elif rule.name == "stuck_pending":
            report.stuck_pending = count
        elif rule.name == "old_tasks":
            report.old_tasks = count
            report.old_tasks_kept = kept

    def _announce(
        self, rule: rules.TaskRule, changes: list[TaskChange], count: int, now: datetime
    ) -> None:
        if isinstance(rule.effect, rules.Delete):
            if count:
                cutoff = now - timedelta(days=self.settings.task_retention_days)
                signals.send(rule.signal, self.sender, count=count, cutoff=cutoff)
            return
        announce.task_changes(
            self.sender,
            changes,
            reason=rule.reason,
            source="sweep",
            failed=rule.signal is signals.task_failed,
        )

    def _report_progress(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)
