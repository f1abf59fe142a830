"""A thin adapter over watchdog: which app directories may have gone, and is the root there.

Watches are non-recursive: the root, each model directory, and the root's parent (to see the root
itself vanish and come back). An app directory removed in any way — ``rm -rf``, ``rmdir``, moved
out, renamed — is a delete or move-away event in its model directory's watch; a whole model
directory removed is one in the root's. Generated apps hold ``node_modules`` and build trees, so
a recursive watch would cost a kernel watch per directory below the root (the `watch` benchmark:
22 watches against 115,021 on such a tree).

The adapter only reports *hints*; the reactor re-checks the disk and the database decides. This
module turns watchdog's events into those hints; the watches themselves are kept by watches.py,
the observer is chosen by observers.py, and the hints are defined in hints.py (their names, and
the observer choice, are importable from here as well).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from fswatch_sync.hints import AppGone, Hint, ModelGone
from fswatch_sync.layout import key_for_path, slug_for_path
from fswatch_sync.observers import NETWORK_FILESYSTEMS, choose_observer_kind, filesystem_type
from fswatch_sync.watches import DRAIN_SECONDS, Drained, Watches, directory_identity

__all__ = [
    "DRAIN_SECONDS",
    "NETWORK_FILESYSTEMS",
    "AppGone",
    "Hint",
    "ModelGone",
    "Watcher",
    "choose_observer_kind",
    "filesystem_type",
]

log = logging.getLogger(__name__)


class Watcher(Watches):
    """Schedules the non-recursive watches and turns events into hints.

    Callbacks run on watchdog's dispatcher thread and must be quick: ``on_hint`` (an app or model
    may be gone), ``on_root_change`` (the root vanished or appeared), ``on_overflow`` (events were
    lost). How the watches stay consistent with that thread is told in :class:`Watches`.
    """

    def __init__(
        self,
        root: Path,
        *,
        on_hint: Callable[[Hint], None],
        on_root_change: Callable[[], None],
        on_overflow: Callable[[], None],
        observer_kind: str = "native",
        polling_interval: float = 1.0,
    ) -> None:
        super().__init__(
            root,
            handler=_Handler(self),
            on_overflow=on_overflow,
            observer_kind=observer_kind,
            polling_interval=polling_interval,
        )
        self.on_hint = on_hint
        self.on_root_change = on_root_change

    def handle(self, event: FileSystemEvent) -> None:
        if isinstance(event, Drained):
            self._drained(event)
            return
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        root = os.path.normpath(self.root)
        if os.path.normpath(src) == root or (dest and os.path.normpath(dest) == root):
            self._root_event(event)
            return
        if isinstance(event, DirMovedEvent):
            self._gone(src)
            slug = slug_for_path(self.root, dest)
            if slug is not None:
                self.watch_model(slug)
            return
        if isinstance(event, DirDeletedEvent):
            # Only a directory: a file or a symbolic link named like an app was never one, and
            # its removal says nothing (the sweep, with its grace, judges such rows).
            self._gone(src)
            return
        if isinstance(event, DirCreatedEvent):
            slug = slug_for_path(self.root, src)
            if slug is not None:
                self.watch_model(slug)

    def _root_event(self, event: FileSystemEvent) -> None:
        """The root itself was removed, renamed away, created, moved into place or (a symbolic
        link) re-pointed: start its watches afresh wherever it now leads.

        One change often arrives as several events (the root's own watch and its parent's, a
        deletion and a creation); only those that find the watched root gone, replaced or its
        watch dead restart the watches, so a restart's short blind spot is not repeated.
        """
        if event.event_type not in ("deleted", "moved", "created") and self._root_watched():
            # "modified": a polling observer sees a root recreated under a reused inode number
            # only so; with the root watched it is just a change inside it.
            return
        identity = directory_identity(self.root)
        if self._still_watching(identity):
            return
        if identity is None:
            # Gone (rm -rf, moved away). watchdog drops the queued events of a watch once it
            # is unscheduled, and the events still queued behind this one are the kernel's own
            # reports of the app and model directories removed before the root went: the
            # watches are dropped only once those have been handled.
            self.on_root_change()
            self._forget_root_when_drained(time.monotonic() + DRAIN_SECONDS)
            return
        self.forget_root()
        self.rewatch()
        self.on_root_change()


    def _gone(self, src: str) -> None:
        key = key_for_path(self.root, src)
        if key is not None:
            self.on_hint(AppGone(key, reported=self.reported(key.model_slug)))
            return
        slug = slug_for_path(self.root, src)
        if slug is not None:
            reported = self.reported(slug)
            self.forget_model(slug)
            self.on_hint(ModelGone(slug, reported=reported))




class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self.watcher.handle(event)
        except Exception:
            log.exception("could not handle filesystem event %r", event)
