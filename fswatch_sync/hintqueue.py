"""The reactor's queue: the hints waiting to be applied, and what becomes of them.

A burst of hints is coalesced into one batch once it settles. Hints are never forgotten: a batch
the database refused goes back to the queue and is tried again with backoff; only when the queue
would grow past its bound are the hints dropped, and a full sweep — which finds everything they
named — is asked for instead. A key whose removal failed on its own (a suspect) waits apart, on
its own backoff; removals the tree proves nothing about now are held back (waiting) for the
sweep to decide. Applying a batch is the reactor's (reactor.py).

Every method is safe to call from any thread: the watcher's dispatcher feeds the queue, the
reactor's thread takes batches from it, and the service reads it for the status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from fswatch_sync.hints import AppGone, Hint, ModelGone
from fswatch_sync.layout import AppKey
from fswatch_sync.stats import Stats
from fswatch_sync.text import first_line, printable

# Logs as fswatch_sync.reactor: to whoever filters the log by name or reads its "%(name)s", these
# are the reactor's lines.
log = logging.getLogger("fswatch_sync.reactor")

MAX_SETTLE_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
FIRST_BACKOFF_SECONDS = 0.1
# How many isolated keys the status names (the count covers them all).
SHOWN_POISON_KEYS = 5


@dataclass
class _Suspect:
    """A key whose removal failed alone, with its own backoff."""

    failures: int
    retry_at: float
    error: str


def _backoff(failures: int) -> float:
    return float(min(FIRST_BACKOFF_SECONDS * 2 ** max(failures - 1, 0), MAX_BACKOFF_SECONDS))


@dataclass(eq=False, repr=False)
class HintQueue:
    """The hints not applied yet, the suspects and the removals held back, under one lock."""

    stats: Stats
    _: KW_ONLY
    request_sweep: Callable[[str], None]
    settle_seconds: float
    max_pending: int

    def __post_init__(self) -> None:
        self._condition = threading.Condition()
        self._keys: set[AppKey] = set()
        self._slugs: set[str] = set()
        # Keys whose removal failed alone: each waits for its own retry, apart from the queue.
        self._suspects: dict[AppKey, _Suspect] = {}
        # The queued hints the kernel itself reported (see hints.AppGone.reported): kept apart
        # from the queue so that a batch put back after a failure keeps them.
        self._reported_keys: set[AppKey] = set()
        self._reported_slugs: set[str] = set()
        # Removals held back because the tree proves nothing now (reason per key or slug),
        # shown in the status; the sweep decides them once the tree is trusted again.
        self._waiting: dict[AppKey, str] = {}
        self._waiting_slugs: dict[str, str] = {}
        self._last_hint = 0.0
        self._backoff = 0.0
        self._retry_at = 0.0

    # -- producer side (watchdog's thread) -------------------------------------------------------

    def submit(self, hint: Hint) -> None:
        with self._condition:
            if isinstance(hint, AppGone):
                if hint.key not in self._suspects:  # already due for its own retry
                    self._keys.add(hint.key)
                if hint.reported:
                    self._reported_keys.add(hint.key)
            elif isinstance(hint, ModelGone):
                self._slugs.add(hint.slug)
                if hint.reported:
                    self._reported_slugs.add(hint.slug)
            self.stats.add("events_handled")
            if self._queued() > self.max_pending:
                log.warning(
                    "more than %d removals queued; dropping them for a full sweep",
                    self.max_pending,
                )
                self._drop_all()
                self.request_sweep("overflow")
            self._publish()
            self._last_hint = time.monotonic()
            self._condition.notify()

    def pending(self) -> int:
        with self._condition:
            return self._queued()

    def poison_keys(self) -> list[AppKey]:
        """The keys being retried on their own after their removal failed alone."""
        with self._condition:
            return sorted(self._suspects)

    def wake(self) -> None:
        """Wake the reactor's thread (to see that its stop event is set)."""
        with self._condition:
            self._condition.notify_all()

    def discard_pending(self) -> None:
        with self._condition:
            self._drop_all()
            self._publish()

    # Called with the condition held.
    def _queued(self) -> int:
        return len(self._keys) + len(self._slugs) + len(self._suspects)

    def _drop_all(self) -> None:
        self._keys.clear()
        self._slugs.clear()
        self._suspects.clear()
        self._reported_keys.clear()
        self._reported_slugs.clear()

    def waiting(self) -> dict[str, Any]:
        """The removals held back until the tree is trusted again, for the status."""
        with self._condition:
            keys = sorted(self._waiting)
            slugs = sorted(self._waiting_slugs)
            reasons = sorted({*self._waiting.values(), *self._waiting_slugs.values()})
        return {
            "apps": len(keys),
            "models": len(slugs),
            "reasons": reasons,
            "sample": [str(key) for key in keys[:20]]
            + [f"{printable(slug)}/*" for slug in slugs[:5]],
        }

    def discard_waiting(self) -> None:
        """The tree is trusted again: a sweep (which judges every row) decides the waiting ones."""
        with self._condition:
            self._waiting.clear()
            self._waiting_slugs.clear()

    def _publish(self) -> None:
        self.stats.set("queue_depth", self._queued())
        self.stats.set("poison_keys", len(self._suspects))
        self.stats.set(
            "poison", [str(key) for key in sorted(self._suspects)[:SHOWN_POISON_KEYS]]
        )

    # -- consumer side (the reactor's thread) -----------------------------------------------------

    def next_batch(self, stop: threading.Event) -> tuple[set[AppKey], set[str]] | None:
        """The queued hints once they may be tried (settled, past the backoff), together with
        the suspects whose own retry is due; None when stopping."""
        with self._condition:
            while True:
                if stop.is_set():
                    return None
                now = time.monotonic()
                queued = bool(self._keys or self._slugs)
                if queued and now >= self._retry_at:
                    break
                if any(s.retry_at <= now for s in self._suspects.values()):
                    break
                deadlines = [s.retry_at for s in self._suspects.values()]
                if queued:
                    deadlines.append(self._retry_at)
                wait = min(deadlines) - now if deadlines else 1.0
                self._condition.wait(timeout=max(min(wait, 1.0), 0.001))
            keys: set[AppKey] = set()
            slugs: set[str] = set()
            if queued and time.monotonic() >= self._retry_at:
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
            now = time.monotonic()
            keys.update(key for key, s in self._suspects.items() if s.retry_at <= now)
            self._publish()
            return keys, slugs

    def _requeue(self, keys: set[AppKey], slugs: set[str]) -> None:
        with self._condition:
            self._keys |= keys - self._suspects.keys()
            self._slugs |= slugs
            for key in keys & self._suspects.keys():  # not before the batch they failed with
                suspect = self._suspects[key]
                suspect.retry_at = max(suspect.retry_at, self._retry_at)
            if self._queued() > self.max_pending:
                self._drop_all()
                self.request_sweep("overflow")
            self._publish()

    def retry_later(self, keys: set[AppKey], slugs: set[str]) -> float:
        """The batch failed as a whole (the database's trouble): ``keys`` and ``slugs`` go back
        to the queue behind a backoff that doubles with each failure in a row; return it."""
        self._backoff = min(max(self._backoff * 2, FIRST_BACKOFF_SECONDS), MAX_BACKOFF_SECONDS)
        self._retry_at = time.monotonic() + self._backoff
        self._requeue(keys, slugs)
        return self._backoff

    def applied(self) -> None:
        """A batch went through: the next failure starts the backoff afresh."""
        self._backoff = 0.0

    # -- what a batch learnt about its keys (the reactor's thread) --------------------------------

    def reported(self, keys: set[AppKey], slugs: set[str]) -> tuple[set[AppKey], set[str]]:
        """Those of ``keys`` and ``slugs`` that the kernel itself reported gone."""
        with self._condition:
            return keys & self._reported_keys, slugs & self._reported_slugs

    def take_model(self, slug: str, found: list[AppKey]) -> list[AppKey]:
        """The keys a batch takes for the model directory ``slug``, whose app keys are ``found``:
        a suspect among them keeps its own schedule, and the kernel's report of the directory
        stands for each of its apps."""
        with self._condition:
            taken = [key for key in found if key not in self._suspects]
            if slug in self._reported_slugs:
                self._reported_keys.update(found)
            self._reported_slugs.discard(slug)
        return taken

    def suspect(self, key: AppKey, exc: Exception) -> None:
        """``key``'s removal failed alone with ``exc``: it waits apart, on its own backoff."""
        with self._condition:
            previous = self._suspects.get(key)
            failures = 1 if previous is None else previous.failures + 1
            backoff = _backoff(failures)
            self._suspects[key] = _Suspect(failures, time.monotonic() + backoff, first_line(exc))
            self._keys.discard(key)
            self._publish()
        self.stats.add("errors")
        self.stats.add("poison_failures")
        if previous is None:
            log.warning(
                "the removal of %s fails on its own; the others go on, it is retried alone"
                " with backoff: %s",
                key,
                first_line(exc),
            )
        else:
            log.debug("the removal of %s failed again (%d times), next try in %.1fs",
                      key, failures, backoff)

    def forget(self, keys: set[AppKey]) -> None:
        """Drop suspects among ``keys`` (left, like the queue, to the sweep)."""
        with self._condition:
            for key in keys:
                self._suspects.pop(key, None)
            self._publish()

    def hold(self, keys: set[AppKey], slugs: set[str], reason: str) -> None:
        """Hold these removals back for ``reason`` (the tree proves nothing about them now)."""
        with self._condition:
            for key in keys:
                self._waiting[key] = reason
            for slug in slugs:
                self._waiting_slugs[slug] = reason
            self._reported_keys -= keys
            self._reported_slugs -= slugs

    def cleared(self, key: AppKey) -> None:
        """``key`` is done with: removed, or back on disk."""
        with self._condition:
            self._reported_keys.discard(key)
            previous = self._suspects.pop(key, None)
            if previous is not None:
                self._publish()
        if previous is not None:
            log.info("the removal of %s went through after %d failures", key, previous.failures)

