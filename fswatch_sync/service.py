"""The service's lifecycle: the watcher, the reactor, the sweeper and a monitor, as threads.

Usable on its own (``Service(settings).start()``), from the Flask extension, or by the daemon.

Which work runs where: the reactor runs in every instance — its removals are idempotent and
re-checked under lock, so instances that share storage can all react. The sweep runs only in the
instance holding the maintenance lease (a row in ``fswatch_sync_leases``), so several instances
on one database never sweep at the same time, and a periodic sweep is skipped when another
instance finished one recently.

This module starts and stops the parts and answers for the instance (status, sweeps on demand);
when to sweep is sweepschedule.py's, and the root's state and the watcher are monitor.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from fswatch_sync import db, records
from fswatch_sync.errors import SweepRefused
from fswatch_sync.monitor import MONITOR_SECONDS, ROOT_SETTLE_SECONDS, Monitor
from fswatch_sync.observers import choose_observer_kind
from fswatch_sync.reactor import Reactor
from fswatch_sync.settings import Settings, describe
from fswatch_sync.stats import Stats
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.sweep_report import SweepReport
from fswatch_sync.sweepschedule import SweepSchedule
from fswatch_sync.text import printable
from fswatch_sync.watcher import Watcher

__all__ = [
    "MONITOR_SECONDS",
    "ROOT_SETTLE_SECONDS",
    "STOP_JOIN_SECONDS",
    "STOP_TOTAL_SECONDS",
    "Service",
]

log = logging.getLogger(__name__)

# stop(): the threads get this long to finish, and the whole stop (the last heartbeat included)
# this long at most, so that ``fswatch-sync run`` exits within the 5 s it promises even while the
# database does not answer.
STOP_JOIN_SECONDS = 3.0
STOP_TOTAL_SECONDS = 4.0


class Service:
    """One running instance of fswatch_sync."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        instance_id: str | None = None,
        initial_sweep: bool = True,
    ) -> None:
        self.settings = settings
        # An engine the service opened is the service's to close when it stops.
        self._owns_engine = store is None
        self.store = store or Store.from_settings(settings)
        self.instance_id = instance_id or records.new_instance_id()
        self.initial_sweep = initial_sweep
        self.stats = Stats()
        self.started_at: datetime | None = None
        self._stop = threading.Event()
        self._sweep_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # Rows of the model directories the last sweep found proving nothing.
        self._untrusted_rows = 0
        self.observer_kind = choose_observer_kind(settings.observer, settings.root)
        self.sweeper = Sweeper(
            self.store, settings, instance_id=self.instance_id, sender=self,
            known_root=lambda: self._monitor.root_seen,
        )
        self.reactor = Reactor(
            self.store,
            settings.root,
            sender=self,
            stats=self.stats,
            request_sweep=self.request_sweep,
            root_unusable=lambda _reason: self._monitor.wake(),
            settle_seconds=settings.settle_ms / 1000,
            max_pending=settings.max_pending_events,
            root_marker=settings.root_marker,
            missing_grace=(
                timedelta(minutes=settings.missing_grace_minutes)
                if settings.missing_grace_minutes > 0
                else None
            ),
            cancel_when_missing=settings.cancel_tasks_when_missing,
            known=lambda slug: self._monitor.known_identity(slug),
        )
        self._monitor = Monitor(
            settings,
            self.store,
            self.stats,
            self.reactor,
            sender=self,
            observer_kind=self.observer_kind,
            request_sweep=self.request_sweep,
            heartbeat=self._heartbeat,
        )
        self._schedule = SweepSchedule(
            settings, self.store, self.stats,
            sweep=lambda trigger: self.sweep_now(trigger=trigger),
        )

    @property
    def watcher(self) -> Watcher:
        """The watcher running now: the monitor replaces one whose observer stopped."""
        return self._monitor.watcher

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the service is already started")
        if self.store.config.manage_host_tables:
            self.store.init_db()
        else:
            self.store.ensure_tool_tables()
        # A mapping that cannot work stops the start (SettingsError: exit 2 for `run`), before
        # any thread exists and before any change; retrying it would never succeed.
        self.store.validate()
        self.started_at = db.utcnow()
        self._stop.clear()
        self.sweeper.interrupted.clear()
        try:
            self.watcher.start()
            self._monitor.update_root_state()
            for name, target in (
                ("reactor", lambda: self.reactor.run(self._stop)),
                ("sweeper", lambda: self._schedule.run(self._stop, self.started_at)),
                ("monitor", lambda: self._monitor.run(self._stop)),
            ):
                thread = threading.Thread(
                    target=target, name=f"fswatch-sync-{name}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._heartbeat()
        except BaseException:
            # All or nothing: a start that failed half-way leaves no observer or thread behind.
            self._stop.set()
            self.reactor.wake()
            self._schedule.wake()
            self._monitor.wake()
            self.watcher.stop()
            for thread in self._threads:
                thread.join(timeout=2)
            self._threads = []
            raise
        if self.initial_sweep and self.settings.enabled:
            self.request_sweep("startup")
        elif self.initial_sweep:
            # enabled = false turns off the sweeps the service starts by itself (start-up and
            # periodic); the reactor still acts on removals, and SIGHUP or POST /sweep still
            # sweep on request.
            log.info("enabled = false: no start-up or periodic sweep; removals still handled")
        log.info(
            "started %s: root %s, database %s, %s observer",
            self.instance_id,
            printable(str(self.settings.root)),
            self.settings.redacted_database_url(),
            self.observer_kind,
        )

    def stop(self, timeout: float = STOP_JOIN_SECONDS) -> None:
        """Stop every thread; an in-flight batch finishes its transaction first."""
        if not self._threads:
            return
        self._stop.set()
        # A sweep in progress stops at its next commit (that batch rolled back), records itself
        # as interrupted and gives the lease up: another instance need not wait for it to expire.
        self.sweeper.interrupt()
        self._schedule.wake()
        self._monitor.wake()
        self.reactor.wake()
        # The threads first: the monitor must not restart the observer being stopped.
        started = time.monotonic()
        deadline = started + timeout
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.05))
        stuck_threads = [thread for thread in self._threads if thread.is_alive()]
        stuck = [thread.name for thread in stuck_threads]
        if stuck:
            log.warning("stopping without waiting longer for %s", ", ".join(stuck))
        self._monitor.stop_watcher()
        self._threads = []
        self.stats.set("watch_state", "stopped")
        self._record_stop(
            max(started + STOP_TOTAL_SECONDS - time.monotonic(), 0.5),
            # Still waiting on the database: it cannot commit any more, but neither can it say
            # so; this thread does, and frees the lease.
            abandon_sweep="fswatch-sync-sweeper" in stuck,
        )
        if self._owns_engine:
            if stuck_threads:
                # A thread still inside a statement holds a connection: disposing now would
                # orphan it; the pool is closed once that thread is done.
                threading.Thread(
                    target=self._dispose_after, args=(stuck_threads,), daemon=True,
                    name="fswatch-sync-closer",
                ).start()
            else:
                self.store.engine.dispose()
        log.info("stopped %s", self.instance_id)

    def _dispose_after(self, threads: list[threading.Thread]) -> None:
        for thread in threads:
            thread.join()
        self.store.engine.dispose()

    def _record_stop(self, limit: float, *, abandon_sweep: bool = False) -> None:
        """The last heartbeat (state stopped), given at most ``limit`` seconds."""

        def record() -> None:
            if abandon_sweep:
                try:
                    self.sweeper.abandon()
                except Exception:
                    log.warning("could not record the interrupted sweep", exc_info=True)
            try:
                self._heartbeat(state="stopped")
            except Exception:
                log.warning("could not record the stop in the database", exc_info=True)

        thread = threading.Thread(target=record, name="fswatch-sync-stop", daemon=True)
        thread.start()
        thread.join(timeout=limit)
        if thread.is_alive():
            log.warning("could not record the stop within %.1fs (database unreachable?)", limit)

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- sweeping -------------------------------------------------------------------------------

    def request_sweep(self, trigger: str = "manual") -> None:
        """Ask the sweeper thread for a full sweep as soon as possible (non-blocking)."""
        self._schedule.request(trigger)

    def sweep_now(
        self,
        *,
        dry_run: bool = False,
        force: bool = False,
        now: datetime | None = None,
        trigger: str = "manual",
    ) -> SweepReport:
        """Run a full sweep in the caller's thread and return its report.

        Raises SweepRefused when the guard refuses and LeaseUnavailable when another instance
        is sweeping.
        """
        with self._sweep_lock:
            try:
                report = self.sweeper.run(now=now, dry_run=dry_run, force=force, trigger=trigger)
            except SweepRefused:
                self.stats.add("sweeps_refused")
                raise
            self._count(report)
            if not report.dry_run:
                self._untrusted_rows = report.untrusted_rows
                self.reactor.discard_waiting()  # the sweep has judged every row
            return report

    def _count(self, report: SweepReport) -> None:
        self.stats.add("sweeps")
        self.stats.observe_sweep(report.duration_seconds)
        self.stats.set("last_sweep_at", db.utcnow().isoformat())
        self.stats.set("last_sweep", report.to_dict())
        if not report.dry_run:
            self.stats.add("apps_removed", report.orphan_apps)
            self.stats.add("tasks_cancelled", report.orphan_tasks + report.stuck_pending)
            self.stats.add("tasks_failed", report.stuck_running)
            self.stats.add("tasks_purged", report.old_tasks)
        if self.settings.missing_grace_minutes > 0:
            self.stats.set("apps_marked_missing", self.store.count_marked())

    # -- status ---------------------------------------------------------------------------------

    def _heartbeat(self, state: str | None = None) -> None:
        records.record_instance(
            self.store.engine,
            self.instance_id,
            state=state or self._monitor.root_state,
            root=str(self.settings.root),
            stats=self.status_stats(),
            now=db.utcnow(),
            started_at=self.started_at or db.utcnow(),
        )

    def status_stats(self) -> dict[str, Any]:
        stats = self.stats.snapshot()
        stats["queue_depth"] = self.reactor.pending()
        waiting = self.reactor.waiting()
        # Rows whose directories cannot be seen now and that nothing removes until the tree
        # proves their absence: every row while the root is missing or empty, else the rows of
        # untrusted model directories (the last sweep's count, or the removals the reactor has
        # held back since).
        stats["waiting_rows"] = max(
            self._monitor.waiting_rows, waiting["apps"], self._untrusted_rows
        )
        stats["waiting"] = waiting
        stats["watches"] = self.watcher.watch_count
        stats["observer"] = self.observer_kind
        return stats

    def status(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "running": self.running,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "root": str(self.settings.root),
            "database": self.settings.redacted_database_url(),
            "stats": self.status_stats(),
            "settings": describe(self.settings),
        }
