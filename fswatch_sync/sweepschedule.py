"""When the service sweeps: on request, every period (with jitter), and again after a miss.

The sweeper thread runs :meth:`SweepSchedule.run`. A requested sweep is never dropped: one that
was skipped or failed is tried again with backoff. A periodic turn is skipped when another
instance finished a sweep within half a period, and a start-up sweep when another instance swept
since this one started: several instances on one database share the maintenance.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from datetime import datetime, timedelta

from fswatch_sync import db, records
from fswatch_sync.errors import LeaseUnavailable, SweepInterrupted, SweepRefused
from fswatch_sync.records import LeaseLost
from fswatch_sync.settings import Settings
from fswatch_sync.stats import Stats
from fswatch_sync.store import Store
from fswatch_sync.text import first_line

# Logs as fswatch_sync.service: to whoever filters the log by name or reads its "%(name)s", these
# are the service's lines.
log = logging.getLogger("fswatch_sync.service")


# Compared by identity, and no repr: the settings hold the database URL and its password.
@dataclass(eq=False, repr=False)
class SweepSchedule:
    """Sweep requests, and the loop that serves them and the periodic sweeps.

    ``sweep(trigger)`` runs one sweep and raises what ``Service.sweep_now`` raises.
    """

    settings: Settings
    store: Store
    stats: Stats
    _: KW_ONLY
    sweep: Callable[[str], object]

    def __post_init__(self) -> None:
        self._wanted = threading.Event()
        self._triggers: list[str] = []
        self._lock = threading.Lock()

    def request(self, trigger: str) -> None:
        """Ask the loop for a sweep as soon as possible (non-blocking)."""
        with self._lock:
            self._triggers.append(trigger)
        self._wanted.set()

    def wake(self) -> None:
        """Wake the loop (to see that its stop event is set)."""
        self._wanted.set()

    def _next_period(self) -> float:
        spread = self.settings.sweep_jitter_fraction
        return self.settings.interval_seconds * (1 + random.uniform(-spread, spread))

    def run(self, stop: threading.Event, started_at: datetime | None) -> None:
        """The sweeper thread's loop, until ``stop``; ``started_at``: when the service started."""
        next_at = time.monotonic() + self._next_period()
        # A requested sweep that was skipped (another holder's lease, e.g. a killed instance's
        # until it expires) or failed (database down) is tried again with backoff, never dropped.
        retry_trigger: str | None = None
        retry_at, backoff = float("inf"), 0.0
        while not stop.is_set():
            wake_at = min(next_at, retry_at)
            fired = self._wanted.wait(timeout=max(wake_at - time.monotonic(), 0.0))
            if stop.is_set():
                return
            self._wanted.clear()
            with self._lock:
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
            if trigger == "startup" and self._swept_since(started_at):
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
            self.sweep(trigger)
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

