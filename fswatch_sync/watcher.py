"""A thin adapter over watchdog: which app directories may have gone, and is the root there.

Watches are non-recursive: the root, each model directory, and the root's parent (to see the root
itself vanish and come back). An app directory removed in any way — ``rm -rf``, ``rmdir``, moved
out, renamed — is a delete or move-away event in its model directory's watch; a whole model
directory removed is one in the root's. Generated apps hold ``node_modules`` and build trees, so
a recursive watch would cost a kernel watch per directory below the root (see DESIGN.md).

The adapter only reports *hints*; the reactor re-checks the disk and the database decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

try:
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

    _OWN_INOTIFY = True
except ImportError:  # not Linux, or a watchdog before 7 (which does not report the overflow)
    _OWN_INOTIFY = False

from fswatch_sync.layout import AppKey, key_for_path, model_dirs, slug_for_path
from fswatch_sync.text import printable

log = logging.getLogger(__name__)

# Filesystems whose changes made by other clients never reach this kernel's inotify.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "fuse.sshfs", "9p", "ceph",
     "glusterfs", "fuse.glusterfs", "lustre", "gpfs", "afs", "fuse.s3fs", "fuse.rclone"}
)
# How long the watches of a root that went are kept for the events still on their way: a root
# moved away (not removed) keeps its watches' emitters running, so this bounds the wait.
DRAIN_SECONDS = 2.0
_PAUSE = threading.Event()  # never set: its wait() paces the drain check


@dataclass(frozen=True)
class AppGone:
    """The app directory may have been removed, moved away or renamed.

    ``reported``: the kernel itself reported the directory unlinked from (or moved out of) its
    model directory, watched on the root's device — a fact no unmount can fake, so it holds even
    when the root is gone by the time the reactor gets to it. A polling observer's hints are
    inferred from listings (an empty mount looks like deletions) and are never ``reported``.
    """

    key: AppKey
    # Evidence about the hint, not part of what it names: equal hints name the same app.
    reported: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class ModelGone:
    """The whole model directory may have been removed: every app of that slug is a candidate.

    ``reported``: as for :class:`AppGone` — the kernel reported the model directory removed
    (``rmdir`` succeeds only on an empty directory, and never on a mount point) or moved out.
    """

    slug: str
    reported: bool = field(default=False, compare=False)


Hint = AppGone | ModelGone


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/mounts (None if unknown)."""
    try:
        target = os.path.realpath(path if path.exists() else path.parent)
        best, best_type = "", None
        with open("/proc/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fields[2]
        return best_type
    except OSError:
        return None


def choose_observer_kind(setting: str, root: Path) -> str:
    """``auto`` is ``polling`` on a network filesystem and ``native`` elsewhere."""
    if setting != "auto":
        return setting
    kind = filesystem_type(root)
    return "polling" if kind in NETWORK_FILESYSTEMS else "native"


def _observer_telling_overflow(on_overflow: Callable[[], None]) -> BaseObserver:
    """The native observer, made to report its own kernel queue's overflow.

    watchdog only logs an overflow (IN_Q_OVERFLOW) and carries on. Every inotify observer reads
    an inotify instance of its own, with its own kernel queue, so the overflow is caught where
    that instance's events are handled, not on watchdog's logger, which every other observer
    in the process (a debug reloader's, say) writes to as well.
    """
    if not _OWN_INOTIFY:
        return Observer()
    return _OwnInotifyObserver(on_overflow)


if _OWN_INOTIFY:

    class _OverflowReportingFD(InotifyFD):
        def __init__(self, on_overflow: Callable[[], None]) -> None:
            super().__init__()
            self._on_overflow = on_overflow

        def handle_event(self, event: InotifyEvent) -> None:
            super().handle_event(event)
            if event.is_queue_overflow:
                self._on_overflow()

    class _OwnInotifyObserver(InotifyObserver):
        def __init__(
            self, on_overflow: Callable[[], None], *, timeout: float = DEFAULT_OBSERVER_TIMEOUT
        ) -> None:
            # InotifyObserver.__init__ would open a plain inotify instance; this is the same
            # set-up around one that reports its overflow.
            inotify_fd = _OverflowReportingFD(on_overflow)
            inotify_fd.start()
            BaseObserver.__init__(self, InotifyEmitter, timeout=timeout, inotify_fd=inotify_fd)
            self._inotify_fd = inotify_fd


class Watcher:
    """Schedules the non-recursive watches and turns events into hints.

    Callbacks run on watchdog's dispatcher thread and must be quick: ``on_hint`` (an app or model
    may be gone), ``on_root_change`` (the root vanished or appeared), ``on_overflow`` (events were
    lost).

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
        on_hint: Callable[[Hint], None],
        on_root_change: Callable[[], None],
        on_overflow: Callable[[], None],
        observer_kind: str = "native",
        polling_interval: float = 1.0,
    ) -> None:
        self.root = root
        self.on_hint = on_hint
        self.on_root_change = on_root_change
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
        self._handler = _Handler(self)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        observer: BaseObserver
        if self.observer_kind == "polling":
            observer = PollingObserver(timeout=self.polling_interval)
        else:
            observer = _observer_telling_overflow(self._observed_overflow)
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
            identity = _identity(self.root)
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
        identity = _identity(self.root / slug, follow=False)
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

    # -- events -----------------------------------------------------------------------------------

    def handle(self, event: FileSystemEvent) -> None:
        if isinstance(event, _Drained):
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
        identity = _identity(self.root)
        with self._lock:
            same = identity is not None and identity == self._root_identity
        if same and self._root_alive():
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

    def _forget_root_when_drained(self, deadline: float) -> None:
        with self._lock:
            observer, parent, epoch = self._observer, self._parent_watch, self._epoch
        if observer is None or parent is None:
            self.forget_root()
            return
        check = _Drained(str(self.root), is_synthetic=True)
        check.epoch, check.deadline = epoch, deadline
        # Behind every event queued so far, on the parent's watch (never dropped meanwhile).
        observer.event_queue.put((check, parent))

    def _drained(self, check: _Drained) -> None:
        with self._lock:
            current = check.epoch == self._epoch and self._observer is not None
            watches = {*self._model_watches.values(), self._root_watch}
            observer, parent = self._observer, self._parent_watch
        if not current or observer is None or parent is None or _identity(self.root) is not None:
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

    def reported(self, slug: str) -> bool:
        """Whether an event from ``slug``'s watch is the kernel's own report of a removal: a
        native observer, and the model directory watched on the root's device (a volume
        mounted over a model directory is another device: its events prove nothing here)."""
        if self.observer_kind == "polling":
            return False
        with self._lock:
            model, root = self._model_identities.get(slug), self._root_identity
        return model is not None and root is not None and model[0] == root[0]

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


class _Drained(FileSystemEvent):
    """Not a filesystem event: queued behind the events of a root that went, so that its
    watches are dropped only once those events have been handled."""

    event_type = "fswatch-sync-drained"
    epoch: int = 0
    deadline: float = 0.0


def _identity(path: Path, *, follow: bool = True) -> tuple[int, int] | None:
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


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self.watcher.handle(event)
        except Exception:
            log.exception("could not handle filesystem event %r", event)
