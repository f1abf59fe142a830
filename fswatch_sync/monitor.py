"""The service's monitor: the root's state, and the watcher kept alive.

The monitor thread looks at the root about once a second: missing or empty (nothing is removed
while it proves nothing), back (watched again, and swept once it stops filling), or replaced
under the watches. It restarts an observer that stopped, mends watches a race left wrong, and
gives the instance's heartbeat. The watcher lives here because a restart replaces it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from fswatch_sync import signals, treehealth
from fswatch_sync.layout import any_app_dir, scan_apps
from fswatch_sync.reactor import Reactor
from fswatch_sync.settings import Settings
from fswatch_sync.stats import Stats
from fswatch_sync.store import Store
from fswatch_sync.text import first_line, printable
from fswatch_sync.watcher import Watcher

# Logs as fswatch_sync.service: to whoever filters the log by name or reads its "%(name)s", these
# are the service's lines.
log = logging.getLogger("fswatch_sync.service")

MONITOR_SECONDS = 1.0
# A root that comes back may still be filling (a backup being restored, a copy in progress): its
# sweep waits until the number of app directories has held still this long, so that apps not yet
# copied back are not taken for orphans.
ROOT_SETTLE_SECONDS = 1.0


# Compared by identity, and no repr: the settings hold the database URL and its password.
@dataclass(eq=False, repr=False)
class Monitor:
    """The root as the service sees it, and the watcher, for the monitor thread.

    Its signals are sent as ``sender``'s (the service); ``heartbeat`` records the instance's row.
    """

    settings: Settings
    store: Store
    stats: Stats
    reactor: Reactor
    _: KW_ONLY
    sender: Any
    observer_kind: str
    request_sweep: Callable[[str], None]
    heartbeat: Callable[[], None]

    def __post_init__(self) -> None:
        self._changed = threading.Event()
        # Held around every change to the watcher (stop, restart, re-watch, repair): the service
        # stopping it and this thread restarting it must not interleave.
        self._lock = threading.Lock()
        self.root_state = "unknown"
        # After the root comes back: (app directories counted, since when) until the count holds
        # still for ROOT_SETTLE_SECONDS; then the root-back sweep runs.
        self._root_back: tuple[int, float] | None = None
        # The watcher restarted the root's watches (root gone, back, replaced, re-pointed).
        self._root_replaced = False
        # The root's (device, inode) when this process last saw it holding an app directory:
        # an empty root that is still that directory had its last apps really deleted.
        self.root_seen: treehealth.Identity | None = None
        # App rows while the root proves nothing: every one waits for it (shown in the status).
        self.waiting_rows = 0
        self.watcher = self._new_watcher()

    def known_identity(self, slug: str | None) -> treehealth.Identity | None:
        """What was seen before: the root's identity when last seen holding apps (None), each
        model directory's when watched (its slug)."""
        if slug is None:
            return self.root_seen
        return self.watcher.model_identity(slug)

    def wake(self) -> None:
        """Look at the root now (and see that the stop event is set)."""
        self._changed.set()

    def stop_watcher(self) -> None:
        """Stop the watcher, never while this thread is restarting or mending it."""
        with self._lock:
            self.watcher.stop()

    def _new_watcher(self) -> Watcher:
        return Watcher(
            self.settings.root,
            on_hint=self.reactor.submit,
            on_root_change=self._on_root_change,
            on_overflow=self._on_overflow,
            observer_kind=self.observer_kind,
            polling_interval=self.settings.polling_interval_seconds,
        )

    def _on_root_change(self) -> None:
        self._root_replaced = True
        self._changed.set()

    def _on_overflow(self) -> None:
        self.stats.add("errors")
        signals.send(
            signals.watch_degraded, self.sender, reason="overflow",
            detail="filesystem events were lost; sweeping",
        )
        self.request_sweep("overflow")

    def _root_problem(self) -> str | None:
        root = treehealth.look_at_root(self.settings.root, self.settings.root_marker)
        if root.seen is not treehealth.Seen.DIRECTORY:
            return treehealth.ROOT_MISSING
        apps_seen = any_app_dir(self.settings.root)
        if apps_seen:
            self.root_seen = root.identity
        return treehealth.judge_root(
            root,
            apps_seen=apps_seen,
            rows_exist=not apps_seen and self.store.app_rows_exist(),
            known=self.root_seen,
        )

    def update_root_state(self) -> None:
        problem = self._root_problem()
        state = problem or "watching"
        # Counted before the state is shown, so that the two never contradict each other; a
        # count the database cannot give now keeps the last one (the state matters more).
        if problem is None:
            self.waiting_rows = 0
        else:
            try:
                self.waiting_rows = treehealth.count_rows(
                    self.store.engine, self.store.host.apps
                )
            except SQLAlchemyError as exc:
                log.debug("cannot count the waiting rows: %s", first_line(exc))
        previous, self.root_state = self.root_state, state
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
            signals.send(signals.watch_degraded, self.sender, reason=problem, detail=detail)
        elif previous in ("root-missing", "root-empty"):
            log.info(
                "the root %s is back; watching again, sweeping once it stops filling",
                printable(str(self.settings.root)),
            )
            with self._lock:
                self.watcher.forget_root()
                self.watcher.rewatch()
            self.reactor.discard_waiting()  # the root-back sweep decides them
            signals.send(
                signals.watch_degraded, self.sender, reason="recovered", detail="root is back"
            )
            self._root_back = (len(scan_apps(self.settings.root)), time.monotonic())

    def _sweep_when_root_settled(self) -> None:
        """Request the root-back sweep once the returned root has stopped filling."""
        if self._root_back is None or self.root_state != "watching":
            return
        count, since = self._root_back
        now_count = len(scan_apps(self.settings.root))
        if now_count != count:
            self._root_back = (now_count, time.monotonic())
        elif time.monotonic() - since >= ROOT_SETTLE_SECONDS:
            self._root_back = None
            self.request_sweep("root-back")

    def run(self, stop: threading.Event) -> None:
        """The monitor thread's loop, until ``stop``."""
        last_beat = time.monotonic()
        restart_backoff = 1.0
        next_restart = 0.0
        while not stop.is_set():
            timeout = MONITOR_SECONDS if self._root_back is None else ROOT_SETTLE_SECONDS / 4
            self._changed.wait(timeout=timeout)
            self._changed.clear()
            if stop.is_set():
                return
            try:
                self.update_root_state()
                if self._root_replaced:
                    self._root_replaced = False
                    if self.root_state == "watching" and self._root_back is None:
                        # Replaced without a gap the monitor saw (a symlink re-pointed, a
                        # volume swapped): events during the re-watch may be lost, and the new
                        # tree is another tree. Sweep it once it stops filling.
                        self._root_back = (len(scan_apps(self.settings.root)), time.monotonic())
                self._sweep_when_root_settled()
                with self._lock:
                    if stop.is_set():
                        return
                    if not self.watcher.is_alive():
                        if time.monotonic() >= next_restart:
                            restart_backoff = self._restart_watcher(restart_backoff)
                            next_restart = time.monotonic() + restart_backoff
                    elif self.root_state == "watching" and self.watcher.repair():
                        log.info("repaired watches a race had left wrong; sweeping")
                        self.request_sweep("recovery")
                if time.monotonic() - last_beat >= self.settings.heartbeat_seconds:
                    last_beat = time.monotonic()
                    self.heartbeat()
            except SQLAlchemyError as exc:
                self.stats.add("errors")
                log.warning("monitor: the database did not answer: %s", first_line(exc))
            except Exception:
                self.stats.add("errors")
                log.exception("monitor check failed")

    def _restart_watcher(self, backoff: float) -> float:
        log.error("the filesystem observer stopped; restarting it and sweeping")
        self.stats.add("errors")
        signals.send(signals.watch_degraded, self.sender, reason="observer-error",
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
