"""From hints to removals: coalesce a burst, re-check the disk, call the store's one removal.

Hints are never forgotten: a batch the database refused stays queued and is tried again with
backoff; only when the queue would grow past its bound are the hints dropped, and a full sweep —
which finds everything they named — is asked for instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from fswatch_sync import announce, db
from fswatch_sync.layout import AppKey, any_app_dir, app_exists, root_present
from fswatch_sync.stats import Stats
from fswatch_sync.store import RemovalOutcome, Store, chunks
from fswatch_sync.watcher import AppGone, Hint, ModelGone

log = logging.getLogger(__name__)

MAX_SETTLE_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0


class Reactor:
    """Owns the queue of hints and the thread that applies them."""

    def __init__(
        self,
        store: Store,
        root: Path,
        *,
        sender: Any,
        stats: Stats,
        request_sweep: Callable[[str], None],
        root_unusable: Callable[[str], None],
        settle_seconds: float = 0.005,
        max_pending: int = 100_000,
        root_marker: str = "",
        missing_grace: timedelta | None = None,
        cancel_when_missing: bool = True,
    ) -> None:
        self.store = store
        self.root = root
        self.sender = sender
        self.stats = stats
        self.request_sweep = request_sweep
        self.root_unusable = root_unusable
        self.settle_seconds = settle_seconds
        self.max_pending = max_pending
        self.root_marker = root_marker
        self.missing_grace = missing_grace
        self.cancel_when_missing = cancel_when_missing
        self._condition = threading.Condition()
        self._keys: set[AppKey] = set()
        self._slugs: set[str] = set()
        self._last_hint = 0.0
        self._backoff = 0.0
        self._retry_at = 0.0

    # -- producer side (watchdog's thread) -------------------------------------------------------

    def submit(self, hint: Hint) -> None:
        with self._condition:
            if isinstance(hint, AppGone):
                self._keys.add(hint.key)
            elif isinstance(hint, ModelGone):
                self._slugs.add(hint.slug)
            self.stats.add("events_handled")
            if len(self._keys) + len(self._slugs) > self.max_pending:
                log.warning(
                    "more than %d removals queued; dropping them for a full sweep",
                    self.max_pending,
                )
                self._keys.clear()
                self._slugs.clear()
                self.request_sweep("overflow")
            self.stats.set("queue_depth", len(self._keys) + len(self._slugs))
            self._last_hint = time.monotonic()
            self._condition.notify()

    def pending(self) -> int:
        with self._condition:
            return len(self._keys) + len(self._slugs)

    def wake(self) -> None:
        """Wake the reactor's thread (to see that its stop event is set)."""
        with self._condition:
            self._condition.notify_all()

    def discard_pending(self) -> None:
        with self._condition:
            self._keys.clear()
            self._slugs.clear()
            self.stats.set("queue_depth", 0)

    # -- consumer side (the reactor's thread) -----------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batch = self._next_batch(stop)
            if batch is None:
                continue
            keys, slugs = batch
            try:
                self._apply(keys, slugs)
            except Exception as exc:
                self._requeue(keys, slugs)
                self.stats.add("errors")
                self._backoff = min(max(self._backoff * 2, 0.1), MAX_BACKOFF_SECONDS)
                self._retry_at = time.monotonic() + self._backoff
                log.warning(
                    "could not apply %d removal(s), retrying in %.1fs: %s",
                    len(keys) + len(slugs),
                    self._backoff,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
            else:
                self._backoff = 0.0

    def _next_batch(self, stop: threading.Event) -> tuple[set[AppKey], set[str]] | None:
        with self._condition:
            while not (self._keys or self._slugs) or time.monotonic() < self._retry_at:
                if stop.is_set():
                    return None
                wait = 1.0 if not (self._keys or self._slugs) else self._retry_at - time.monotonic()
                self._condition.wait(timeout=max(min(wait, 1.0), 0.001))
            # Let a burst settle: wait until no hint arrived for the settle window, bounded.
            first = time.monotonic()
            while not stop.is_set():
                quiet_for = time.monotonic() - self._last_hint
                settled = time.monotonic() - first > MAX_SETTLE_SECONDS
                if quiet_for >= self.settle_seconds or settled:
                    break
                self._condition.wait(timeout=self.settle_seconds - quiet_for)
            keys, slugs = self._keys, self._slugs
            self._keys, self._slugs = set(), set()
            self.stats.set("queue_depth", 0)
            return keys, slugs

    def _requeue(self, keys: set[AppKey], slugs: set[str]) -> None:
        with self._condition:
            self._keys |= keys
            self._slugs |= slugs
            if len(self._keys) + len(self._slugs) > self.max_pending:
                self._keys.clear()
                self._slugs.clear()
                self.request_sweep("overflow")
            self.stats.set("queue_depth", len(self._keys) + len(self._slugs))

    def _apply(self, keys: set[AppKey], slugs: set[str]) -> None:
        """Remove the rows of the apps that are really gone, a store batch at a time.

        Each batch is announced as soon as it has committed. ``keys`` and ``slugs`` are consumed
        as the work is done, so when a batch fails they hold exactly what is left to retry.
        """
        if not root_present(self.root, self.root_marker):
            # An unmounted or deleted root says nothing about the apps: act on nothing; the
            # sweep after the root's return reconciles everything.
            self.root_unusable("root-missing")
            return
        if not any_app_dir(self.root):
            self.root_unusable("root-empty")
            return
        for slug in sorted(slugs):
            keys.update(self.store.app_keys_for_slug(slug))
            slugs.discard(slug)
        absent = sorted(key for key in keys if not app_exists(self.root, key))
        keys.intersection_update(absent)  # the rest are back on disk: nothing to do
        for part in chunks(absent, max(self.store.batch_size, 1)):
            outcome = self.store.remove_apps(
                part,
                source="reactor",
                now=db.utcnow(),
                still_absent=lambda key: not app_exists(self.root, key),
                missing_grace=self.missing_grace,
                cancel_when_missing=self.cancel_when_missing,
            )
            keys.difference_update(part)
            self._report(outcome)

    def _report(self, outcome: RemovalOutcome) -> None:
        self.stats.add("apps_removed", len(outcome.removed))
        self.stats.add("tasks_cancelled", outcome.cancelled_count)
        if outcome.removed:
            log.info(
                "removed %d app row(s), cancelled %d task(s): %s",
                len(outcome.removed),
                outcome.cancelled_count,
                ", ".join(str(k) for k in outcome.removed[:5])
                + (" ..." if len(outcome.removed) > 5 else ""),
            )
        announce.removal(self.sender, outcome, "reactor")
