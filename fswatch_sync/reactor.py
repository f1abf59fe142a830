"""From hints to removals: coalesce a burst, re-check the disk, call the store's one removal.

The queue — coalescing, retries, what waits — is hintqueue.py's; this module applies its batches.

One bad key never holds the others back. A transient failure (the database is away, locked) is
the database's, not a key's: the whole batch waits and is tried again. Any other failure may be
one row the database refuses (a host's CHECK constraint or trigger, a value out of range): the
batch is split in halves until each failing key stands alone, the rest are applied at once, and
each bad key is retried on its own backoff, counted (``poison_keys``) and logged once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from fswatch_sync import announce, db, treehealth
from fswatch_sync.batching import chunks
from fswatch_sync.hintqueue import (
    FIRST_BACKOFF_SECONDS,
    MAX_BACKOFF_SECONDS,
    MAX_SETTLE_SECONDS,
    SHOWN_POISON_KEYS,
    HintQueue,
)
from fswatch_sync.hints import Hint
from fswatch_sync.layout import AppKey, any_app_dir, app_exists, apps_present, scan_tree
from fswatch_sync.outcomes import RemovalOutcome
from fswatch_sync.stats import Stats
from fswatch_sync.store import Store
from fswatch_sync.text import first_line, printable

__all__ = [
    "FIRST_BACKOFF_SECONDS",
    "MAX_BACKOFF_SECONDS",
    "MAX_SETTLE_SECONDS",
    "SHOWN_POISON_KEYS",
    "Reactor",
]

log = logging.getLogger(__name__)


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
        self.root_unusable = root_unusable
        self.root_marker = root_marker
        self.missing_grace = missing_grace
        self.cancel_when_missing = cancel_when_missing
        # What was seen before: the root's identity when last seen holding apps (None), each
        # model directory's when watched (its slug). See treehealth.
        self.known: Callable[[str | None], treehealth.Identity | None] = known or (
            lambda _name: None
        )
        self._queue = HintQueue(
            stats,
            request_sweep=request_sweep,
            settle_seconds=settle_seconds,
            max_pending=max_pending,
        )
        self._untrusted_logged: set[str] = set()

    # -- the queue, fed by the watcher and shown by the service ---------------------------------

    def submit(self, hint: Hint) -> None:
        self._queue.submit(hint)

    def pending(self) -> int:
        return self._queue.pending()

    def poison_keys(self) -> list[AppKey]:
        """The keys being retried on their own after their removal failed alone."""
        return self._queue.poison_keys()

    def wake(self) -> None:
        """Wake the reactor's thread (to see that its stop event is set)."""
        self._queue.wake()

    def discard_pending(self) -> None:
        self._queue.discard_pending()

    def waiting(self) -> dict[str, Any]:
        """The removals held back until the tree is trusted again, for the status."""
        return self._queue.waiting()

    def discard_waiting(self) -> None:
        """The tree is trusted again: a sweep (which judges every row) decides the waiting ones."""
        self._queue.discard_waiting()

    # -- applying (the reactor's thread) ----------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batch = self._queue.next_batch(stop)
            if batch is None:
                continue
            keys, slugs = batch
            try:
                self._apply(keys, slugs)
            except Exception as exc:
                self.stats.add("errors")
                backoff = self._queue.retry_later(keys, slugs)
                log.warning(
                    "could not apply %d removal(s), retrying in %.1fs: %s",
                    len(keys) + len(slugs),
                    backoff,
                    first_line(exc),
                )
            else:
                self._queue.applied()

    def _apply(self, keys: set[AppKey], slugs: set[str]) -> None:
        """Remove the rows of the apps that are really gone, a store batch at a time.

        Each batch is announced as soon as it has committed. ``keys`` and ``slugs`` are consumed
        as the work is done, so when a batch fails they hold exactly what is left to retry.
        """
        reported_keys, reported_slugs = self._queue.reported(keys, slugs)
        root = treehealth.look_at_root(self.root, self.root_marker)
        if (keys - reported_keys) or (slugs - reported_slugs):
            # Only what the kernel did not itself report needs the tree to prove absence.
            problem = self._root_problem(root)
            if problem is not None:
                self.root_unusable(problem)
                self._queue.forget(keys - reported_keys)  # suspects among them: left to the sweep
                self._queue.hold(*self._with_rows(keys - reported_keys, slugs - reported_slugs),
                                 problem)
                keys &= reported_keys
                slugs &= reported_slugs
        for slug in sorted(slugs):
            keys.update(self._queue.take_model(slug, self.store.app_keys_for_slug(slug)))
            slugs.discard(slug)
        untrusted: dict[str, str] = {}
        for slug in sorted({key.model_slug for key in keys}):
            reason = self._model_problem(slug, root)
            if reason is not None:
                untrusted[slug] = reason
        if untrusted:
            held = {key for key in keys if key.model_slug in untrusted}
            self._queue.forget(held)
            for key in held:
                self._queue.hold({key}, set(), untrusted[key.model_slug])
            keys -= held
            self._log_untrusted(untrusted)
        absent = sorted(key for key in keys if not app_exists(self.root, key))
        for key in keys.difference(absent):  # back on disk: nothing to do, nothing suspect
            self._queue.cleared(key)
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
            self._queue.cleared(key)
        self._report(outcome)

    def _isolate(self, keys: Sequence[AppKey], exc: Exception) -> None:
        """``keys`` failed together with ``exc``: apply them in halves, down to each failing key
        alone (which becomes a suspect).

        A transient error on the way stops the search; what it had not tried yet goes back to
        the queue with the batch (the run loop's backoff).
        """
        if len(keys) == 1:
            self._queue.suspect(keys[0], exc)
            return
        middle = len(keys) // 2
        for half in (keys[:middle], keys[middle:]):
            try:
                self._remove(half)
            except Exception as failure:
                if db.is_transient(failure):
                    raise
                self._isolate(half, failure)

    def _with_rows(self, keys: set[AppKey], slugs: set[str]) -> tuple[set[AppKey], set[str]]:
        """Those of ``keys`` and ``slugs`` that still have rows: the others have nothing to wait
        for (a second, unreported event of a directory already handled, say)."""
        found = {
            slug: set(self.store.app_keys_for_slug(slug))
            for slug in slugs | {key.model_slug for key in keys}
        }
        return {key for key in keys if key in found[key.model_slug]}, {s for s in slugs if found[s]}

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

    def _log_untrusted(self, untrusted: dict[str, str]) -> None:
        fresh = sorted(set(untrusted) - self._untrusted_logged)
        if fresh:
            self._untrusted_logged.update(fresh)
            log.warning(
                "model directories that prove nothing about their apps (another device than"
                " the root, or no app while rows exist); their removals wait: %s",
                ", ".join(f"{printable(slug)} ({untrusted[slug]})" for slug in fresh),
            )

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
