"""The service's lifecycle: the watcher, the reactor, the sweeper and a monitor, as threads.

Usable on its own (``Service(settings).start()``), from the Flask extension, or by the daemon.

Which work runs where: the reactor runs in every instance — its removals are idempotent and
re-checked under lock, so instances that share storage can all react. The sweep runs only in the
instance holding the maintenance lease (a row in ``fswatch_sync_leases``), so several instances
on one database never sweep at the same time, and a periodic sweep is skipped when another
instance finished one recently.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from fswatch_sync import db, records, signals, treehealth
from fswatch_sync.errors import LeaseUnavailable, SweepInterrupted, SweepRefused
from fswatch_sync.layout import any_app_dir, scan_apps
from fswatch_sync.reactor import Reactor
from fswatch_sync.records import LeaseLost
from fswatch_sync.settings import Settings, describe
from fswatch_sync.stats import Stats
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.sweep_report import SweepReport
from fswatch_sync.text import first_line, printable
from fswatch_sync.watcher import Watcher, choose_observer_kind

log = logging.getLogger(__name__)

MONITOR_SECONDS = 1.0
# A root that comes back may still be filling (a backup being restored, a copy in progress): its
# sweep waits until the number of app directories has held still this long, so that apps not yet
# copied back are not taken for orphans.
ROOT_SETTLE_SECONDS = 1.0
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
        self._sweep_wanted = threading.Event()
        self._root_changed = threading.Event()
        self._triggers: list[str] = []
        self._triggers_lock = threading.Lock()
        self._sweep_lock = threading.Lock()
        self._watcher_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._root_state = "unknown"
        # After the root comes back: (app directories counted, since when) until the count holds
        # still for ROOT_SETTLE_SECONDS; then the root-back sweep runs.
        self._root_back: tuple[int, float] | None = None
        # The watcher restarted the root's watches (root gone, back, replaced, re-pointed).
        self._root_replaced = False
        # The root's (device, inode) when this process last saw it holding an app directory:
        # an empty root that is still that directory had its last apps really deleted.
        self._root_seen: treehealth.Identity | None = None
        # App rows while the root proves nothing: every one waits for it (shown in the status).
        self._waiting_rows = 0
        # Rows of the model directories the last sweep found proving nothing.
        self._untrusted_rows = 0
        self.observer_kind = choose_observer_kind(settings.observer, settings.root)
        self.sweeper = Sweeper(
            self.store, settings, instance_id=self.instance_id, sender=self,
            known_root=lambda: self._root_seen,
        )
        self.reactor = Reactor(
            self.store,
            settings.root,
            sender=self,
            stats=self.stats,
            request_sweep=self.request_sweep,
            root_unusable=lambda _reason: self._root_changed.set(),
            settle_seconds=settings.settle_ms / 1000,
            max_pending=settings.max_pending_events,
            root_marker=settings.root_marker,
            missing_grace=(
                timedelta(minutes=settings.missing_grace_minutes)
                if settings.missing_grace_minutes > 0
                else None
            ),
            cancel_when_missing=settings.cancel_tasks_when_missing,
            known=self._known_identity,
        )
        self.watcher = self._new_watcher()

    def _known_identity(self, slug: str | None) -> treehealth.Identity | None:
        if slug is None:
            return self._root_seen
        return self.watcher.model_identity(slug)

    def _new_watcher(self) -> Watcher:
        return Watcher(
            self.settings.root,
            on_hint=self.reactor.submit,
            on_root_change=self._on_root_change,
            on_overflow=self._on_overflow,
            observer_kind=self.observer_kind,
            polling_interval=self.settings.polling_interval_seconds,
        )

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
            self._update_root_state()
            for name, target in (
                ("reactor", lambda: self.reactor.run(self._stop)),
                ("sweeper", self._sweep_loop),
                ("monitor", self._monitor_loop),
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
            self._sweep_wanted.set()
            self._root_changed.set()
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
        self._sweep_wanted.set()
        self._root_changed.set()
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
        with self._watcher_lock:
            self.watcher.stop()
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
        with self._triggers_lock:
            self._triggers.append(trigger)
        self._sweep_wanted.set()

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

    def _next_period(self) -> float:
        spread = self.settings.sweep_jitter_fraction
        return self.settings.interval_seconds * (1 + random.uniform(-spread, spread))

    def _sweep_loop(self) -> None:
        next_at = time.monotonic() + self._next_period()
        # A requested sweep that was skipped (another holder's lease, e.g. a killed instance's
        # until it expires) or failed (database down) is tried again with backoff, never dropped.
        retry_trigger: str | None = None
        retry_at, backoff = float("inf"), 0.0
        while not self._stop.is_set():
            wake_at = min(next_at, retry_at)
            fired = self._sweep_wanted.wait(timeout=max(wake_at - time.monotonic(), 0.0))
            if self._stop.is_set():
                return
            self._sweep_wanted.clear()
            with self._triggers_lock:
                triggers, self._triggers = self._triggers, []
            if triggers:
                trigger = triggers[0]
            elif retry_trigger is not None and time.monotonic() >= retry_at:
                trigger = retry_trigger
            elif fired:
                # A request already served by the sweep that just ran (its trigger was taken
                # with that sweep's): not a reason for a periodic sweep now.
                continue
            else:
                next_at = time.monotonic() + self._next_period()
                if not self.settings.enabled or self._swept_recently():
                    continue
                trigger = "periodic"
            if trigger == "startup" and self._swept_since(self.started_at):
                # Several workers started together: the first one's sweep covers them all.
                log.info("start-up sweep skipped: another instance swept since this one started")
                self.stats.add("sweeps_skipped")
                retry_trigger, retry_at, backoff = None, float("inf"), 0.0
                continue
            if self._sweep_quietly(trigger):
                retry_trigger, retry_at, backoff = None, float("inf"), 0.0
            elif trigger != "periodic":  # a skipped periodic sweep is the other instance's turn
                retry_trigger = retry_trigger or trigger
                backoff = min(max(backoff * 2, 1.0), max(self.settings.lease_seconds / 2, 1.0))
                retry_at = time.monotonic() + backoff
            next_at = time.monotonic() + self._next_period()

    def _swept_recently(self) -> bool:
        """Another instance finished a sweep within half a period: this one skips its turn."""
        try:
            sweeps = records.recent_sweeps(self.store.engine, limit=5)
        except Exception as exc:  # the sweep itself will meet the error, log it and retry
            log.warning("cannot read the recent sweeps: %s", first_line(exc))
            return False
        for sweep in sweeps:
            if sweep["outcome"] == "ok" and sweep["finished_at"]:
                finished = datetime.fromisoformat(sweep["finished_at"])
                age = db.utcnow() - finished
                return age < timedelta(seconds=self.settings.interval_seconds / 2)
        return False

    def _swept_since(self, moment: datetime | None) -> bool:
        if moment is None:
            return False
        try:
            sweeps = records.recent_sweeps(self.store.engine, limit=5)
        except Exception as exc:
            log.warning("cannot read the recent sweeps: %s", first_line(exc))
            return False
        return any(
            sweep["outcome"] == "ok"
            and sweep["started_at"]
            and datetime.fromisoformat(sweep["started_at"]) >= moment
            for sweep in sweeps
        )

    def _sweep_quietly(self, trigger: str) -> bool:
        """Sweep; False when the sweep was skipped or failed and should be tried again."""
        try:
            self.sweep_now(trigger=trigger)
        except LeaseUnavailable as exc:
            log.info("sweep (%s) skipped: %s; trying again later", trigger, exc)
            return False
        except LeaseLost as exc:
            # Another instance took the lease over (this one stalled past it): expected, and
            # the batch in flight was rolled back.
            log.info("sweep (%s) stopped: %s", trigger, exc)
            return False
        except SweepRefused:
            pass  # the sweeper logged why; nothing was changed
        except SweepInterrupted:
            log.info("sweep (%s) interrupted: the service is stopping", trigger)
        except Exception:
            self.stats.add("errors")
            # Read by /healthz: maintenance that keeps failing makes the instance unhealthy.
            self.stats.add("sweep_failures_in_a_row")
            log.exception("sweep (%s) failed; trying again later", trigger)
            return False
        self.stats.set("sweep_failures_in_a_row", 0)
        return True

    # -- watching the root ------------------------------------------------------------------------

    def _on_root_change(self) -> None:
        self._root_replaced = True
        self._root_changed.set()

    def _on_overflow(self) -> None:
        self.stats.add("errors")
        signals.send(
            signals.watch_degraded, self, reason="overflow",
            detail="filesystem events were lost; sweeping",
        )
        self.request_sweep("overflow")

    def _root_problem(self) -> str | None:
        root = treehealth.look_at_root(self.settings.root, self.settings.root_marker)
        if root.seen is not treehealth.Seen.DIRECTORY:
            return treehealth.ROOT_MISSING
        apps_seen = any_app_dir(self.settings.root)
        if apps_seen:
            self._root_seen = root.identity
        return treehealth.judge_root(
            root,
            apps_seen=apps_seen,
            rows_exist=not apps_seen and self.store.app_rows_exist(),
            known=self._root_seen,
        )

    def _update_root_state(self) -> None:
        problem = self._root_problem()
        state = problem or "watching"
        # Counted before the state is shown, so that the two never contradict each other; a
        # count the database cannot give now keeps the last one (the state matters more).
        if problem is None:
            self._waiting_rows = 0
        else:
            try:
                self._waiting_rows = treehealth.count_rows(
                    self.store.engine, self.store.host.apps
                )
            except SQLAlchemyError as exc:
                log.debug("cannot count the waiting rows: %s", first_line(exc))
        previous, self._root_state = self._root_state, state
        self.stats.set("watch_state", state)
        if state == previous:
            return
        if problem is not None:
            # Queued hints stay: the reactor applies what the kernel itself reported and holds
            # the rest (shown as waiting) until the root is back.
            self._root_back = None
            root = printable(str(self.settings.root))
            detail = (
                f"the root {root} is missing or not mounted; removing nothing"
                if problem == "root-missing"
                else f"the root {root} has no app directory while app rows exist"
                " and is not the directory seen holding apps; removing nothing"
            )
            log.warning("%s", detail)
            signals.send(signals.watch_degraded, self, reason=problem, detail=detail)
        elif previous in ("root-missing", "root-empty"):
            log.info(
                "the root %s is back; watching again, sweeping once it stops filling",
                printable(str(self.settings.root)),
            )
            with self._watcher_lock:
                self.watcher.forget_root()
                self.watcher.rewatch()
            self.reactor.discard_waiting()  # the root-back sweep decides them
            signals.send(signals.watch_degraded, self, reason="recovered", detail="root is back")
            self._root_back = (len(scan_apps(self.settings.root)), time.monotonic())

    def _sweep_when_root_settled(self) -> None:
        """Request the root-back sweep once the returned root has stopped filling."""
        if self._root_back is None or self._root_state != "watching":
            return
        count, since = self._root_back
        now_count = len(scan_apps(self.settings.root))
        if now_count != count:
            self._root_back = (now_count, time.monotonic())
        elif time.monotonic() - since >= ROOT_SETTLE_SECONDS:
            self._root_back = None
            self.request_sweep("root-back")

    def _monitor_loop(self) -> None:
        last_beat = time.monotonic()
        restart_backoff = 1.0
        next_restart = 0.0
        while not self._stop.is_set():
            timeout = MONITOR_SECONDS if self._root_back is None else ROOT_SETTLE_SECONDS / 4
            self._root_changed.wait(timeout=timeout)
            self._root_changed.clear()
            if self._stop.is_set():
                return
            try:
                self._update_root_state()
                if self._root_replaced:
                    self._root_replaced = False
                    if self._root_state == "watching" and self._root_back is None:
                        # Replaced without a gap the monitor saw (a symlink re-pointed, a
                        # volume swapped): events during the re-watch may be lost, and the new
                        # tree is another tree. Sweep it once it stops filling.
                        self._root_back = (len(scan_apps(self.settings.root)), time.monotonic())
                self._sweep_when_root_settled()
                with self._watcher_lock:
                    if self._stop.is_set():
                        return
                    if not self.watcher.is_alive():
                        if time.monotonic() >= next_restart:
                            restart_backoff = self._restart_watcher(restart_backoff)
                            next_restart = time.monotonic() + restart_backoff
                    elif self._root_state == "watching" and self.watcher.repair():
                        log.info("repaired watches a race had left wrong; sweeping")
                        self.request_sweep("recovery")
                if time.monotonic() - last_beat >= self.settings.heartbeat_seconds:
                    last_beat = time.monotonic()
                    self._heartbeat()
            except SQLAlchemyError as exc:
                self.stats.add("errors")
                log.warning("monitor: the database did not answer: %s", first_line(exc))
            except Exception:
                self.stats.add("errors")
                log.exception("monitor check failed")

    def _restart_watcher(self, backoff: float) -> float:
        log.error("the filesystem observer stopped; restarting it and sweeping")
        self.stats.add("errors")
        signals.send(signals.watch_degraded, self, reason="observer-error",
                     detail="the observer stopped; restarting")
        self.watcher.stop()
        self.watcher = self._new_watcher()
        try:
            self.watcher.start()
        except Exception:
            log.exception("could not restart the observer; next try in %.0fs", backoff * 2)
            return min(backoff * 2, 60.0)
        self.request_sweep("recovery")
        return 1.0

    # -- status ---------------------------------------------------------------------------------

    def _heartbeat(self, state: str | None = None) -> None:
        records.record_instance(
            self.store.engine,
            self.instance_id,
            state=state or self._root_state,
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
        stats["waiting_rows"] = max(self._waiting_rows, waiting["apps"], self._untrusted_rows)
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
