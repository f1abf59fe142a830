"""Which watchdog observer watches the root: native, or polling on a network filesystem.

The native observer is made to report its own kernel queue's overflow, which watchdog only logs:
lost events must turn into a full sweep.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from watchdog.observers import Observer
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.polling import PollingObserver

try:
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

    _OWN_INOTIFY = True
except ImportError:  # not Linux, or a watchdog before 7 (which does not report the overflow)
    _OWN_INOTIFY = False

# Filesystems whose changes made by other clients never reach this kernel's inotify.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "fuse.sshfs", "9p", "ceph",
     "glusterfs", "fuse.glusterfs", "lustre", "gpfs", "afs", "fuse.s3fs", "fuse.rclone"}
)


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


def new_observer(
    kind: str, *, polling_interval: float, on_overflow: Callable[[], None]
) -> BaseObserver:
    """An observer of ``kind`` (``polling`` or ``native``), not started yet."""
    if kind == "polling":
        return PollingObserver(timeout=polling_interval)
    return _observer_telling_overflow(on_overflow)


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
