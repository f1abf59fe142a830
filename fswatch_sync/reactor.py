"""From hints to removals: coalesce a burst, re-check the disk, call the store's one removal.

Hints are never forgotten: a batch the database refused stays queued and is tried again with
backoff; only when the queue would grow past its bound are the hints dropped, and a full sweep —
which finds everything they named — is asked for instead.

One bad key never holds the others back. A transient failure (the database is away, locked) is
the database's, not a key's: the whole batch waits and is tried again. Any other failure may be
one row the database refuses (a host's CHECK constraint or trigger, a value out of range): the
batch is split in halves until each failing key stands alone, the rest are applied at once, and
each bad key is retried on its own backoff, counted (``poison_keys``) and logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from fswatch_sync import announce, db, treehealth
from fswatch_sync.layout import AppKey, any_app_dir, app_exists, apps_present, scan_tree
from fswatch_sync.stats import Stats
from fswatch_sync.store import RemovalOutcome, Store, chunks
from fswatch_sync.text import first_line, printable
from fswatch_sync.watcher import AppGone, Hint, ModelGone

log = logging.getLogger(__name__)

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
        known: Callable[[str | None], treehealth.Identity | None] | None = None,
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
        # What was seen before: the root's identity when last seen holding apps (None), each
        # model directory's when watched (its slug). See treehealth.
        self.known: Callable[[str | None], treehealth.Identity | None] = known or (
            lambda _name: None
        )
        self._condition = threading.Condition()
        self._keys: set[AppKey] = set()
        self._slugs: set[str] = set()
        # Keys whose removal failed alone: each waits for its own retry, apart from the queue.
        self._suspects: dict[AppKey, _Suspect] = {}
        # The queued hints the kernel itself reported (see watcher.AppGone.reported): kept apart
        # from the queue so that a batch put back after a failure keeps them.
        self._reported_keys: set[AppKey] = set()
        self._reported_slugs: set[str] = set()
        # Removals held back because the tree proves nothing now (reason per key or slug),
        # shown in the status; the sweep decides them once the tree is trusted again.
        self._waiting: dict[AppKey, str] = {}
        self._waiting_slugs: dict[str, str] = {}
        self._untrusted_logged: set[str] = set()
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

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batch = self._next_batch(stop)
            if batch is None:
                continue
            keys, slugs = batch
            try:
                self._apply(keys, slugs)
            except Exception as exc:
                self.stats.add("errors")
                self._backoff = min(max(self._backoff * 2, FIRST_BACKOFF_SECONDS),
                                    MAX_BACKOFF_SECONDS)
                self._retry_at = time.monotonic() + self._backoff
                self._requeue(keys, slugs)
                log.warning(
                    "could not apply %d removal(s), retrying in %.1fs: %s",
                    len(keys) + len(slugs),
                    self._backoff,
                    first_line(exc),
                )
            else:
                self._backoff = 0.0

    def _next_batch(self, stop: threading.Event) -> tuple[set[AppKey], set[str]] | None:
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

    def _apply(self, keys: set[AppKey], slugs: set[str]) -> None:
        """Remove the rows of the apps that are really gone, a store batch at a time.

        Each batch is announced as soon as it has committed. ``keys`` and ``slugs`` are consumed
        as the work is done, so when a batch fails they hold exactly what is left to retry.
        """
        with self._condition:
            reported_keys = keys & self._reported_keys
            reported_slugs = slugs & self._reported_slugs
        root = treehealth.look_at_root(self.root, self.root_marker)
        if (keys - reported_keys) or (slugs - reported_slugs):
            # Only what the kernel did not itself report needs the tree to prove absence.
            problem = self._root_problem(root)
            if problem is not None:
                self.root_unusable(problem)
                self._forget(keys - reported_keys)  # suspects among them: left to the sweep
                self._hold(keys - reported_keys, slugs - reported_slugs, problem)
                keys &= reported_keys
                slugs &= reported_slugs
        for slug in sorted(slugs):
            found = self.store.app_keys_for_slug(slug)
            with self._condition:
                # A suspect of this model keeps its own schedule.
                keys.update(key for key in found if key not in self._suspects)
                if slug in self._reported_slugs:
                    self._reported_keys.update(found)
                self._reported_slugs.discard(slug)
            slugs.discard(slug)
        untrusted: dict[str, str] = {}
        for slug in sorted({key.model_slug for key in keys}):
            reason = self._model_problem(slug, root)
            if reason is not None:
                untrusted[slug] = reason
        if untrusted:
            held = {key for key in keys if key.model_slug in untrusted}
            self._forget(held)
            for key in held:
                self._hold({key}, set(), untrusted[key.model_slug])
            keys -= held
            self._log_untrusted(untrusted)
        absent = sorted(key for key in keys if not app_exists(self.root, key))
        for key in keys.difference(absent):  # back on disk: nothing to do, nothing suspect
            self._cleared(key)
        keys.intersection_update(absent)
        for part in chunks(absent, max(self.store.batch_size, 1)):
            try:
                self._remove(part)
            except Exception as exc:
                if db.is_transient(exc):
                    raise  # the database's trouble, not a key's: the whole batch waits
                self._isolate(part, exc)
            keys.difference_update(part)

    def _remove(self, keys: Sequence[AppKey]) -> None:
        outcome = self.store.remove_apps(
            keys,
            source="reactor",
            now=db.utcnow(),
            present_now=lambda keys: apps_present(self.root, keys),
            missing_grace=self.missing_grace,
            cancel_when_missing=self.cancel_when_missing,
        )
        for key in keys:
            self._cleared(key)
        self._report(outcome)

    def _isolate(self, keys: Sequence[AppKey], exc: Exception) -> None:
        """``keys`` failed together with ``exc``: apply them in halves, down to each failing key
        alone (which becomes a suspect).

        A transient error on the way stops the search; what it had not tried yet goes back to
        the queue with the batch (the run loop's backoff).
        """
        if len(keys) == 1:
            self._suspect(keys[0], exc)
            return
        middle = len(keys) // 2
        for half in (keys[:middle], keys[middle:]):
            try:
                self._remove(half)
            except Exception as failure:
                if db.is_transient(failure):
                    raise
                self._isolate(half, failure)

    def _suspect(self, key: AppKey, exc: Exception) -> None:
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

    def _forget(self, keys: set[AppKey]) -> None:
        """Drop suspects among ``keys`` (left, like the queue, to the sweep)."""
        with self._condition:
            for key in keys:
                self._suspects.pop(key, None)
            self._publish()

    def _root_problem(self, root: treehealth.Look) -> str | None:
        """treehealth's verdict on the root for hints that need the tree to prove absence."""
        if root.seen is not treehealth.Seen.DIRECTORY:
            return treehealth.ROOT_MISSING
        apps_seen = any_app_dir(self.root)
        return treehealth.judge_root(
            root,
            apps_seen=apps_seen,
            rows_exist=not apps_seen and self.store.app_rows_exist(),
            known=self.known(None),
        )

    def _model_problem(self, slug: str, root: treehealth.Look) -> str | None:
        model = treehealth.look(self.root / slug, follow=False)
        if model.seen is not treehealth.Seen.DIRECTORY:
            return treehealth.judge_model(
                model, root_device=root.device, apps_seen=False, rows_exist=True, known=None
            )
        # Without a watch to compare with (no watcher), an empty model directory counts as the
        # one the hint came from; with one, it must still be that directory.
        known = self.known(slug) or model.identity
        return treehealth.judge_model(
            model,
            root_device=root.device,
            # Still the watched directory: whether it shows apps changes nothing (no listing).
            apps_seen=model.identity == known or bool(scan_tree(self.root, [slug]).present),
            rows_exist=True,
            known=known,
        )

    def _hold(self, keys: set[AppKey], slugs: set[str], reason: str) -> None:
        with self._condition:
            for key in keys:
                self._waiting[key] = reason
            for slug in slugs:
                self._waiting_slugs[slug] = reason
            self._reported_keys -= keys
            self._reported_slugs -= slugs

    def _log_untrusted(self, untrusted: dict[str, str]) -> None:
        fresh = sorted(set(untrusted) - self._untrusted_logged)
        if fresh:
            self._untrusted_logged.update(fresh)
            log.warning(
                "model directories that prove nothing about their apps (another device than"
                " the root, or no app while rows exist); their removals wait: %s",
                ", ".join(f"{printable(slug)} ({untrusted[slug]})" for slug in fresh),
            )

    def _cleared(self, key: AppKey) -> None:
        with self._condition:
            self._reported_keys.discard(key)
            previous = self._suspects.pop(key, None)
            if previous is not None:
                self._publish()
        if previous is not None:
            log.info("the removal of %s went through after %d failures", key, previous.failures)

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
