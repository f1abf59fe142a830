"""Issue 11, point 8: only our own observer's overflow means that our events were lost.

Another watchdog observer in the same process (Flask's debug reloader watches the source tree)
reads an inotify instance of its own, with its own kernel queue. Its overflow lost none of our
events, yet, detected on watchdog's process-wide logger, it made us sweep: 280 sweeps in 35 s
under ``flask run --debug``.

The overflows here are real: an observer's inotify reader is held (the in-process analogue of
the daemon frozen by SIGSTOP in the fault rounds) while more events than the kernel queues
(``fs.inotify.max_queued_events``) are made in a directory it watches.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import stays_false, wait_until
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from fswatch_sync.watcher import Watcher


def _max_queued_events() -> int:
    try:
        return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except (OSError, ValueError):
        return 16384


def overflow(observer: BaseObserver, directory: Path) -> None:
    """Fill ``observer``'s kernel queue past its limit with events in ``directory``."""
    reader_lock: threading.Lock = observer._inotify_fd._lock  # type: ignore[attr-defined]
    # Each new file is three events (create, open, close-write); the reader takes one buffer
    # of at most 2048 events before it waits for the lock.
    files = (_max_queued_events() + 4096) // 3 + 1
    with reader_lock:
        for number in range(files):
            os.close(os.open(directory / f"f{number}", os.O_CREAT | os.O_WRONLY, 0o644))


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def __call__(self) -> None:
        with self.lock:
            self.count += 1


@pytest.fixture
def ours(apps_root: Path) -> Iterator[tuple[Watcher, _Counter, Path]]:
    model = apps_root / "openai_gpt-4"
    (model / "app1").mkdir(parents=True)
    counter = _Counter()
    watcher = Watcher(
        apps_root, on_hint=lambda _hint: None, on_root_change=lambda: None,
        on_overflow=counter, observer_kind="native",
    )
    watcher.start()
    wait_until(lambda: watcher.watched_models() == {"openai_gpt-4"}, what="the model's watch")
    yield watcher, counter, model
    watcher.stop()


@pytest.fixture
def reloader(tmp_path: Path) -> Iterator[tuple[BaseObserver, Path]]:
    """A plain watchdog observer of another tree, as a reloader in the same process has."""
    source = tmp_path / "source"
    source.mkdir()
    observer = Observer()
    observer.schedule(FileSystemEventHandler(), str(source), recursive=False)
    observer.start()
    yield observer, source
    observer.stop()
    observer.join(timeout=5)


def test_another_observers_overflow_does_not_trigger_ours(
    ours: tuple[Watcher, _Counter, Path],
    reloader: tuple[BaseObserver, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher, counter, model = ours
    other, source = reloader
    other_reader = other._inotify_fd  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, logger="watchdog")

    overflow(other, source)

    def reported_by_other() -> bool:
        return any(
            "overflow" in record.getMessage().lower() and record.thread == other_reader.ident
            for record in caplog.records
        )

    # watchdog has logged the other observer's overflow (every handler of that record, ours
    # included, has run by then): it must not count as ours.
    wait_until(reported_by_other, what="the other observer's overflow, as watchdog logs it")
    assert counter.count == 0
    # A warning naming the overflow from anywhere else (a reloader's own logging) neither.
    logging.getLogger("watchdog.observers.inotify_c").warning(
        "Inotify queue overflowed; filesystem events were lost"
    )
    assert counter.count == 0

    overflow(watcher._observer, model)  # type: ignore[arg-type]
    wait_until(lambda: counter.count >= 1, what="our own overflow")
    assert stays_false(lambda: counter.count > 1, 0.2), "one overflow, one report"


def test_our_overflow_is_reported_whatever_the_watchdog_loggers_level(
    ours: tuple[Watcher, _Counter, Path],
) -> None:
    """The host may quiet watchdog's loggers; the overflow must reach us all the same."""
    watcher, counter, model = ours
    quiet = logging.getLogger("watchdog")
    level, propagate = quiet.level, quiet.propagate
    quiet.setLevel(logging.CRITICAL)
    inotify_logger = logging.getLogger("watchdog.observers.inotify_c")
    inner_level = inotify_logger.level
    inotify_logger.setLevel(logging.CRITICAL)
    try:
        overflow(watcher._observer, model)  # type: ignore[arg-type]
        wait_until(lambda: counter.count >= 1, what="our own overflow")
        assert counter.count >= 1
    finally:
        quiet.setLevel(level)
        quiet.propagate = propagate
        inotify_logger.setLevel(inner_level)
