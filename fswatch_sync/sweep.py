"""The full reconciliation pass: orphan apps, orphan tasks, stuck tasks, old tasks — in that order.

The sweep compares the tree with the app keys (the only comparison made in Python: the disk is
not in the database), asks the guard, then applies the rules of :mod:`fswatch_sync.rules` one
after another; every predicate is evaluated by the database, under lock, in the store's batches.
A dry run applies the very same rules in one transaction that it rolls back, so it reports
exactly what a real run would do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fswatch_sync import announce, db, rules, signals, treehealth
from fswatch_sync.errors import SweepInterrupted, SweepRefused
from fswatch_sync.layout import AppKey, Scan, apps_present, scan_tree
from fswatch_sync.records import Lease, SweepLog
from fswatch_sync.settings import Settings
from fswatch_sync.store import AppRow, Store, TaskChange
from fswatch_sync.text import first_line, printable
from fswatch_sync.treehealth import Seen, TreeRecord

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class SweepReport:
    """What one sweep did (or, in a dry run, would do)."""

    dry_run: bool = False
    forced: bool = False
    orphan_apps: int = 0
    orphan_app_rows: int = 0
    marked_missing: int = 0
    failed_apps: int = 0
    failed_tasks: int = 0
    orphan_tasks: int = 0
    stuck_tasks: int = 0
    old_tasks: int = 0
    old_tasks_kept: int = 0
    journal_pruned: int = 0
    dependents_deleted: int = 0
    dependents_nullified: int = 0
    stuck_running: int = 0
    stuck_pending: int = 0
    blocked_apps: int = 0
    kept_present: int = 0
    app_rows: int = 0
    app_keys: int = 0
    app_dirs: int = 0
    unreadable_dirs: int = 0
    refused: str | None = None
    # Model directories that prove nothing about their apps (see treehealth); their rows stay.
    untrusted_models: list[str] = field(default_factory=list)
    untrusted_rows: int = 0
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
            # orphan_apps counts app keys (directories); a key may own several rows.
            "orphan_app_rows": self.orphan_app_rows,
            "marked_missing": self.marked_missing,
            # Refused by the database (a host constraint or trigger), left for the next sweep.
            "failed_apps": self.failed_apps,
            "failed_tasks": self.failed_tasks,
            "old_tasks_kept": self.old_tasks_kept,
            "dependents_deleted": self.dependents_deleted,
            "dependents_nullified": self.dependents_nullified,
            "app_keys": self.app_keys,
            "kept_present": self.kept_present,
            "app_rows": self.app_rows,
            "app_dirs": self.app_dirs,
            "unreadable_dirs": self.unreadable_dirs,
            "untrusted_models": self.untrusted_models,
            "untrusted_rows": self.untrusted_rows,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "duration_seconds": round(self.duration_seconds, 3),
        }


# -- pure planning ---------------------------------------------------------------------------


def orphan_keys(
    present: set[AppKey], rows: Iterable[AppRow], unknown_slugs: Iterable[str] = ()
) -> list[AppKey]:
    """App keys without a directory, except keys in the new-app grace (judged by the database:
    ``AppRow.young``) and keys in a model directory that could not be listed (absence not
    proven)."""
    unknown = frozenset(unknown_slugs)
    # An AppKey is a tuple: (slug, number) finds it in ``present`` without building one per row.
    return sorted(
        AppKey(slug, int(number))
        for slug, number, _rows, young in rows
        if not young and (slug, number) not in present and slug not in unknown
    )


def guard(
    *,
    root_problem: str | None,
    rows: int,
    orphans: int,
    max_fraction: float,
    force: bool,
) -> str | None:
    """Why the sweep must not run now, or None.

    ``root_problem`` is :mod:`fswatch_sync.treehealth`'s verdict on the root (an empty root was
    already let through there when it is the directory seen holding apps before, or when the
    operator allowed it); ``--force`` never passes it. ``force`` passes only the fraction. A
    single removal is never a mass deletion, unless the fraction is 0 (nothing without --force).
    """
    if root_problem == treehealth.ROOT_MISSING:
        return "the root is missing (not mounted?); nothing was changed"
    if root_problem is not None:
        return (
            f"the root holds no app directory while {rows} app rows exist and it is not the"
            " directory seen holding apps before (an unmounted volume's mount point looks like"
            " this); nothing was changed (use --allow-empty-root if the apps are really gone)"
        )
    if force:
        return None
    allowed = max(max_fraction * rows, 1.0 if max_fraction > 0 else 0.0)
    if rows and orphans > allowed:
        return (
            f"{orphans} of {rows} app rows ({orphans / rows:.0%}) have no directory, more than the"
            f" allowed {max_fraction:.0%}; nothing was changed (use --force to proceed)"
        )
    return None


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
        known_root: Callable[[], treehealth.Identity | None] | None = None,
    ) -> None:
        self.store = store
        # The root's identity as this process last saw it holding apps (a running service).
        self.known_root = known_root
        self.tree_record = TreeRecord(store.engine, settings.root)
        self._untrusted_logged: dict[str, str] = {}
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
        self._apply(
            store, report, now, force=force, live=True,
            allow_empty_root=allow_empty_root, force_models=force_models,
        )

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

    def _judge_tree(
        self,
        report: SweepReport,
        store: Store,
        now: datetime,
        grace: timedelta,
        *,
        live: bool,
        force: bool,
        allow_empty_root: bool,
        force_models: Iterable[str],
    ) -> tuple[list[AppKey], set[AppKey]]:
        """Scan the tree, ask treehealth which parts of it prove absence, and apply the guard:
        the orphan keys and the apps present, or SweepRefused."""
        settings, root = self.settings, self.settings.root
        root_ok = treehealth.look_at_root(root, settings.root_marker).seen is Seen.DIRECTORY
        scan = scan_tree(root) if root_ok else Scan(set(), frozenset(), root_listed=False)
        present = scan.present
        if scan.unreadable:
            log.warning(
                "%d model directories could not be listed; their apps are left alone: %s",
                len(scan.unreadable),
                ", ".join(printable(slug) for slug in sorted(scan.unreadable)[:5]),
            )
        rows = store.app_rows(young_after=now - grace)
        report.app_keys, report.app_dirs = len(rows), len(present)
        report.app_rows = sum(row[2] for row in rows)
        report.unreadable_dirs = len(scan.unreadable)
        row_slugs = Counter(row[0] for row in rows)
        recorded = self._recorded_tree(live)
        known = dict(recorded)
        if self.known_root is not None and (seen := self.known_root()) is not None:
            known[None] = seen  # this process saw it holding apps more recently than any sweep
        health = treehealth.assess(
            root,
            marker=settings.root_marker,
            root_listed=root_ok and scan.root_listed,
            present=present,
            unreadable=scan.unreadable,
            row_slugs=row_slugs,
            known=known,
            allow_empty_root=allow_empty_root,
            force_models=force_models,
        )
        untrusted = {
            slug: reason
            for slug, reason in health.untrusted.items()
            if reason != treehealth.MODEL_UNREADABLE
        }
        report.untrusted_models = sorted(untrusted)
        report.untrusted_rows = sum(row[2] for row in rows if row[0] in untrusted)
        candidates = (
            orphan_keys(present, rows, health.untrusted) if settings.cleanup_orphan_apps else []
        )
        refusal = guard(
            root_problem=health.root_problem,
            rows=len(rows),
            orphans=len(candidates),
            max_fraction=settings.max_delete_fraction,
            # An operator who says the root is really empty has said every row goes.
            force=force or (allow_empty_root and not present),
        )
        if refusal is not None:
            if health.root_problem is not None:
                # A path with a newline (or bytes that are not UTF-8) is quoted: one line.
                shown = str(root) if str(root).isprintable() else repr(str(root))
                refusal = f"{shown}: {refusal}"
            log.warning("sweep refused: %s", refusal)
            raise SweepRefused(refusal)
        if untrusted != self._untrusted_logged:
            self._untrusted_logged = untrusted
            if untrusted:
                log.warning(
                    "%d model directories do not prove their apps absent (a volume mounted over"
                    " or under them, or no app while rows exist); their %d rows are left alone"
                    " (--force-model SLUG to sweep one): %s",
                    len(untrusted),
                    report.untrusted_rows,
                    ", ".join(
                        f"{printable(slug)} ({why})" for slug, why in sorted(untrusted.items())
                    ),
                )
        if live:
            self.tree_record.save(
                health.seen_holding_apps, forget=health.absent_models, known=recorded, now=now
            )
        return candidates, present

    def _recorded_tree(self, live: bool) -> dict[str | None, treehealth.Identity]:
        try:
            return self.tree_record.load()
        except sa.exc.DBAPIError:
            if live:
                raise
            return {}  # a dry run on a database whose tool tables were never created

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
