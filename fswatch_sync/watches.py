"""The watches of one observer: the root's parent, the root and each model directory.

They are kept in step with the tree — made when a directory appears, dropped when it goes (a
root that went only once the events still queued for it are handled), mended when a race left
one wrong — and each records the (device, inode) it was made on: that tells whether an event is
the kernel's own report of a removal on the root's device.

What the events mean is the watcher's (watcher.py); this is the bookkeeping under it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver, ObservedWatch

from fswatch_sync.layout import model_dirs
from fswatch_sync.observers import new_observer
from fswatch_sync.text import printable

# Logs as fswatch_sync.watcher: to whoever filters the log by name or reads its "%(name)s", these
# are the watcher's lines.
log = logging.getLogger("fswatch_sync.watcher")

# How long the watches of a root that went are kept for the events still on their way: a root
# moved away (not removed) keeps its watches' emitters running, so this bounds the wait.
DRAIN_SECONDS = 2.0
_PAUSE = threading.Event()  # never set: its wait() paces the drain check


class Watches:
    """The observer and its non-recursive watches; events go to ``handler``.

    ``on_overflow`` runs when the observer's events were lost.

    Locking: watchdog calls the handler while holding its observer's lock, and the handler adds
    and drops watches (which takes that lock again). So this class never calls ``schedule`` or
    ``unschedule`` while holding its own lock — another thread (the service's monitor) doing so
    would wait for the observer's lock while the dispatcher waits for ours. Instead, a watch is
    scheduled outside the lock and recorded afterwards, unless the root or that model directory
    was forgotten in between (``_epoch`` and ``_model_epochs`` count those), in which case it is
    dropped again.
    """

    def __init__(
        self,
        root: Path,
        *,
        handler: FileSystemEventHandler,
        on_overflow: Callable[[], None],
        observer_kind: str = "native",
        polling_interval: float = 1.0,
    ) -> None:
        self.root = root
        self.on_overflow = on_overflow
        self.observer_kind = observer_kind
        self.polling_interval = polling_interval
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self._model_watches: dict[str, ObservedWatch] = {}
        # (device, inode) of each model directory when its (last) watch was made.
        self._model_identities: dict[str, tuple[int, int]] = {}
        self._root_watch: ObservedWatch | None = None
        self._parent_watch: ObservedWatch | None = None
        # (device, inode) of the directory the root led to when its watch was made.
        self._root_identity: tuple[int, int] | None = None
        self._epoch = 0
        self._model_epochs: dict[str, int] = {}
        self._handler = handler

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        observer = new_observer(
            self.observer_kind,
            polling_interval=self.polling_interval,
            on_overflow=self._observed_overflow,
        )
        with self._lock:
            self._observer = observer
            self._model_watches.clear()
            self._model_identities.clear()
            self._root_watch, self._root_identity = None, None
            self._epoch += 1
        try:
            # The parent is watched so the root's own removal and return are seen.
            parent = observer.schedule(self._handler, str(self.root.parent), recursive=False)
            with self._lock:
                self._parent_watch = parent
            self._watch_root_and_models()
            observer.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        with self._lock:
            observer, self._observer = self._observer, None
            self._parent_watch = None
            self._model_watches.clear()
            self._model_identities.clear()
            self._root_watch, self._root_identity = None, None
            self._epoch += 1
        if observer is not None:
            if observer.is_alive():
                observer.stop()
                observer.join(timeout=5)
            else:  # never started: its emitters (and inotify's reader thread) still need closing
                observer.on_thread_stop()

    def is_alive(self) -> bool:
        observer = self._observer
        return observer is not None and observer.is_alive()

    @property
    def watch_count(self) -> int:
        with self._lock:
            if self._observer is None:
                return 0
            return len(self._model_watches) + (1 if self._root_watch else 0) + 1

    def model_identity(self, slug: str) -> tuple[int, int] | None:
        """(device, inode) of the model directory when its watch was made, if it has one."""
        with self._lock:
            return self._model_identities.get(slug)

    def watched_models(self) -> frozenset[str]:
        """Slugs of the model directories that have a watch now."""
        with self._lock:
            return frozenset(self._model_watches)

    def _observed_overflow(self) -> None:
        # From the observer's inotify thread: an observer already stopped (the watcher's last,
        # or one a restart replaced) may still hand over its final events; the sweep of the
        # next start covers those.
        with self._lock:
            running = self._observer is not None
        if running:
            self.inject_overflow()

    def inject_overflow(self) -> None:
        """Events were lost (the kernel queue overflowed): tell the service."""
        log.warning("filesystem events were lost (queue overflow); a full sweep follows")
        self.on_overflow()

    # -- watches ----------------------------------------------------------------------------------

    def _schedule(
        self, observer: BaseObserver, path: Path, *, follow_symlink: bool = False
    ) -> ObservedWatch | None:
        try:
            return observer.schedule(
                self._handler, str(path), recursive=False, follow_symlink=follow_symlink
            )
        except OSError as exc:
            # Gone again before it could be watched: the watch one level up reports that.
            log.debug("cannot watch %s: %s", printable(str(path)), exc)
            return None

    def _watch_root_and_models(self) -> None:
        """Watch the root and every model directory in it (no-op for those already watched)."""
        if not os.path.isdir(self.root):
            return
        with self._lock:
            observer, epoch, need_root = self._observer, self._epoch, self._root_watch is None
        if observer is None:
            return
        if need_root:
            # The root may be a symbolic link to a volume (layout follows it): watch what it
            # points to, not the link itself, or new model directories go unseen.
            identity = directory_identity(self.root)
            watch = self._schedule(observer, self.root, follow_symlink=True)
            if watch is None:
                return
            with self._lock:
                current = observer is self._observer and epoch == self._epoch
                if current and self._root_watch is None:
                    self._root_watch, self._root_identity = watch, identity
                kept = current or self._root_watch == watch
            if not kept:
                _unschedule(observer, watch)
                return
        for slug in model_dirs(self.root):
            self.watch_model(slug)

    def watch_model(self, slug: str) -> None:
        with self._lock:
            observer = self._observer
            if observer is None or slug in self._model_watches:
                return
            epoch, model_epoch = self._epoch, self._model_epochs.get(slug, 0)
        identity = directory_identity(self.root / slug, follow=False)
        watch = self._schedule(observer, self.root / slug)
        if watch is None:
            return
        with self._lock:
            current = (
                observer is self._observer
                and epoch == self._epoch
                and model_epoch == self._model_epochs.get(slug, 0)
            )
            if current and slug not in self._model_watches:
                self._model_watches[slug] = watch
                if identity is not None:
                    self._model_identities[slug] = identity
                else:
                    self._model_identities.pop(slug, None)
            kept = current or self._model_watches.get(slug) == watch
        if not kept:
            _unschedule(observer, watch)

    def forget_model(self, slug: str) -> None:
        with self._lock:
            watch = self._model_watches.pop(slug, None)
            # Its identity stays until a new watch replaces it: the model directory's own
            # deletion event may still be queued behind the root watch's report of it.
            self._model_epochs[slug] = self._model_epochs.get(slug, 0) + 1
            observer = self._observer
        if watch is not None and observer is not None:
            _unschedule(observer, watch)

    def forget_root(self) -> None:
        with self._lock:
            watches = list(self._model_watches.values())
            if self._root_watch is not None:
                watches.append(self._root_watch)
            self._model_watches.clear()
            self._model_identities.clear()
            self._root_watch, self._root_identity = None, None
            self._epoch += 1
            observer = self._observer
        if observer is not None:
            for watch in watches:
                _unschedule(observer, watch)

    def _root_watched(self) -> bool:
        with self._lock:
            return self._root_watch is not None

    def rewatch(self) -> None:
        """The root is back (or may be): watch it and its model directories again."""
        self._watch_root_and_models()

    def repair(self) -> int:
        """Mend watches a race left wrong; return how many were mended.

        A model directory that appeared while the root's watch was being set up, one removed and
        recreated between two events, or an emitter that stopped (its directory vanished) leave
        a model unwatched or watched through a dead emitter. The service's monitor calls this
        about once a second; it costs one ``scandir`` of the root.
        """
        with self._lock:
            observer, root_watch = self._observer, self._root_watch
            models = dict(self._model_watches)
        if observer is None or not os.path.isdir(self.root):
            return 0
        live = {
            emitter.watch
            for emitter in list(observer.emitters)
            if emitter.is_alive() and emitter.should_keep_running()
        }
        if root_watch is None or root_watch not in live:
            self.forget_root()
            self.rewatch()
            return 1
        mended = 0
        on_disk = set(model_dirs(self.root))
        for slug, watch in models.items():
            if slug not in on_disk:
                self.forget_model(slug)  # its removal event is on its way; nothing was missed
            elif watch not in live:
                self.forget_model(slug)
                self.watch_model(slug)
                mended += 1
        for slug in sorted(on_disk - self.watched_models()):
            self.watch_model(slug)
            mended += slug in self.watched_models()
        return mended

    # -- the root gone or replaced; what an event proves ------------------------------------------

    def _forget_root_when_drained(self, deadline: float) -> None:
        with self._lock:
            observer, parent, epoch = self._observer, self._parent_watch, self._epoch
        if observer is None or parent is None:
            self.forget_root()
            return
        check = Drained(str(self.root), is_synthetic=True)
        check.epoch, check.deadline = epoch, deadline
        # Behind every event queued so far, on the parent's watch (never dropped meanwhile).
        observer.event_queue.put((check, parent))

    def _drained(self, check: Drained) -> None:
        with self._lock:
            current = check.epoch == self._epoch and self._observer is not None
            watches = {*self._model_watches.values(), self._root_watch}
            observer, parent = self._observer, self._parent_watch
        if (
            not current or observer is None or parent is None
            or directory_identity(self.root) is not None
        ):
            return  # re-watched meanwhile, or back (its own event restarts the watches)
        # An emitter still running may hold events it has not queued yet (a removed directory's
        # emitter stops at its own deletion, once it has queued everything before it).
        busy = any(
            emitter.watch in watches and emitter.is_alive() and emitter.should_keep_running()
            for emitter in list(observer.emitters)
        )
        if busy and time.monotonic() < check.deadline:
            _PAUSE.wait(0.005)
            observer.event_queue.put((check, parent))
            return
        self.forget_root()

    def _root_alive(self) -> bool:
        with self._lock:
            observer, watch = self._observer, self._root_watch
        if observer is None or watch is None:
            return False
        return any(
            emitter.watch == watch and emitter.is_alive() and emitter.should_keep_running()
            for emitter in list(observer.emitters)
        )

    def _still_watching(self, identity: tuple[int, int] | None) -> bool:
        """Whether ``identity`` is the directory the root's watch was made on, and that watch's
        emitter still runs."""
        with self._lock:
            same = identity is not None and identity == self._root_identity
        return same and self._root_alive()

    def reported(self, slug: str) -> bool:
        """Whether an event from ``slug``'s watch is the kernel's own report of a removal: a
        native observer, and the model directory watched on the root's device (a volume
        mounted over a model directory is another device: its events prove nothing here)."""
        if self.observer_kind == "polling":
            return False
        with self._lock:
            model, root = self._model_identities.get(slug), self._root_identity
        return model is not None and root is not None and model[0] == root[0]


class Drained(FileSystemEvent):
    """Not a filesystem event: queued behind the events of a root that went, so that its
    watches are dropped only once those events have been handled."""

    event_type = "fswatch-sync-drained"
    epoch: int = 0
    deadline: float = 0.0


def directory_identity(path: Path, *, follow: bool = True) -> tuple[int, int] | None:
    """(device, inode) of the directory ``path`` leads to, or None when it is not one."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _unschedule(observer: BaseObserver, watch: ObservedWatch) -> None:
    # watchdog may already have dropped a watch whose directory vanished
    with contextlib.suppress(KeyError, OSError):
        observer.unschedule(watch)

