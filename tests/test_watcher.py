"""The watchdog adapter alone: which hints each removal gives, root loss, overflow, watch count.

A real observer on real directories; the callbacks record what they are told, and each test
waits for what it expects, then (through a later event in the same watch, which arrives after)
checks that nothing else came.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from watchdog.events import DirModifiedEvent
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, WatchDescriptor

from fswatch_sync.hints import AppGone, Hint, ModelGone
from fswatch_sync.layout import AppKey
from fswatch_sync.observers import choose_observer_kind
from fswatch_sync.watcher import Watcher

SLUG = "openai_gpt-4"


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hints: list[Hint] = []
        self.root_changes = 0
        self.overflows = 0

    def hint(self, hint: Hint) -> None:
        with self.lock:
            self.hints.append(hint)

    def root_changed(self) -> None:
        with self.lock:
            self.root_changes += 1

    def overflow(self) -> None:
        with self.lock:
            self.overflows += 1

    def seen(self, hint: Hint) -> bool:
        with self.lock:
            return hint in self.hints


def make_watcher(root: Path, recorder: Recorder, kind: str = "native") -> Watcher:
    return Watcher(
        root,
        on_hint=recorder.hint,
        on_root_change=recorder.root_changed,
        on_overflow=recorder.overflow,
        observer_kind=kind,
        polling_interval=0.05,
    )


@pytest.fixture
def tree(apps_root: Path) -> Path:
    for slug in (SLUG, "other_model"):
        for number in (1, 2, 3):
            (apps_root / slug / f"app{number}" / "node_modules" / "x").mkdir(parents=True)
    return apps_root


@pytest.fixture(params=["native", "polling"])
def observer_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def watcher(tree: Path, recorder: Recorder, observer_kind: str) -> Iterator[Watcher]:
    started = make_watcher(tree, recorder, observer_kind)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def settle(root: Path, recorder: Recorder, slug: str) -> AppGone:
    """Remove a marker app in ``slug`` and wait for its hint: that model directory's earlier
    events are in (each watch has its own emitter, so only the same watch keeps order)."""
    shutil.rmtree(root / slug / "app3")
    marker = AppGone(AppKey(slug, 3))
    wait_until(lambda: recorder.seen(marker), what="the marker hint")
    return marker


def test_watches_are_not_recursive(watcher: Watcher, tree: Path) -> None:
    # the root's parent, the root, two model directories: none below an app directory
    assert watcher.watch_count == 4
    assert watcher.watched_models() == {SLUG, "other_model"}


def test_files_and_directories_inside_an_app_give_no_hint(
    watcher: Watcher, tree: Path, recorder: Recorder
) -> None:
    shutil.rmtree(tree / SLUG / "app1" / "node_modules")
    (tree / SLUG / "notes").mkdir()
    os.rmdir(tree / SLUG / "notes")  # not an app name
    (tree / SLUG / "README").write_text("x")
    os.unlink(tree / SLUG / "README")
    marker = settle(tree, recorder, SLUG)
    assert recorder.hints == [marker]


@pytest.mark.parametrize("how", ["rmtree", "rename-out", "rename-old", "rename-prefix"])
def test_each_removal_of_an_app_directory_is_a_hint(
    watcher: Watcher, tree: Path, tmp_path: Path, recorder: Recorder, how: str
) -> None:
    app = tree / SLUG / "app2"
    if how == "rmtree":
        shutil.rmtree(app)
    elif how == "rename-out":
        os.rename(app, tmp_path / "app2")
    elif how == "rename-old":
        os.rename(app, app.with_name("app2.old"))
    else:
        os.rename(app, app.with_name("old-app2"))
    gone = AppGone(AppKey(SLUG, 2))
    wait_until(lambda: recorder.seen(gone), what="the app's hint")
    marker = settle(tree, recorder, SLUG)
    assert recorder.hints == [gone, marker]  # one hint, nothing for the directory's new name


def test_rmdir_of_an_empty_app_directory_is_a_hint(
    watcher: Watcher, tree: Path, recorder: Recorder
) -> None:
    (tree / SLUG / "app9").mkdir()
    marker = settle(tree, recorder, SLUG)  # the polling observer has seen it before it goes
    os.rmdir(tree / SLUG / "app9")
    gone = AppGone(AppKey(SLUG, 9))
    wait_until(lambda: recorder.seen(gone), what="the app's hint")
    assert recorder.hints == [marker, gone]


def test_model_directory_removed_is_one_hint_and_its_watch_goes(
    watcher: Watcher, tree: Path, recorder: Recorder
) -> None:
    shutil.rmtree(tree / SLUG)
    wait_until(lambda: recorder.seen(ModelGone(SLUG)), what="the model's hint")
    wait_until(lambda: SLUG not in watcher.watched_models(), what="the watch to go")
    assert watcher.watch_count == 3


def test_new_model_directory_gets_a_watch(
    watcher: Watcher, tree: Path, recorder: Recorder
) -> None:
    (tree / "new_model" / "app4").mkdir(parents=True)
    wait_until(lambda: "new_model" in watcher.watched_models(), what="the new watch")
    shutil.rmtree(tree / "new_model" / "app4")
    wait_until(lambda: recorder.seen(AppGone(AppKey("new_model", 4))), what="the hint")
    assert recorder.hints == [AppGone(AppKey("new_model", 4))]  # creating it hinted nothing
    assert watcher.watched_models() == {SLUG, "other_model", "new_model"}


def test_root_removed_and_back(watcher: Watcher, tree: Path, recorder: Recorder) -> None:
    shutil.rmtree(tree)
    wait_until(lambda: recorder.root_changes >= 1, what="the root change")
    wait_until(lambda: watcher.watch_count == 1, what="only the parent's watch left")
    before = recorder.root_changes
    (tree / SLUG / "app7").mkdir(parents=True)
    wait_until(lambda: recorder.root_changes > before, what="the root's return")
    wait_until(lambda: SLUG in watcher.watched_models(), what="the model watched again")
    shutil.rmtree(tree / SLUG / "app7")
    wait_until(lambda: recorder.seen(AppGone(AppKey(SLUG, 7))), what="a hint after the return")
    assert recorder.hints[-1] == AppGone(AppKey(SLUG, 7))
    assert watcher.watched_models() == {SLUG}  # only what came back
    assert watcher.watch_count == 3


def test_root_replaced_and_reported_only_as_modified_is_watched_again(
    tree: Path, recorder: Recorder
) -> None:
    # The polling observer diffs the parent's listing: a root removed and recreated between two
    # polls under the same inode number (file systems reuse them at once) is only "modified".
    watcher = make_watcher(tree, recorder, "polling")
    watcher.start()
    try:
        watcher.forget_root()  # the root's own emitter saw it vanish
        assert watcher.watch_count == 1
        watcher.handle(DirModifiedEvent(str(tree)))
        assert watcher.watch_count == 4
        assert recorder.root_changes == 1
        watcher.handle(DirModifiedEvent(str(tree)))  # watched already: nothing to do
        assert recorder.root_changes == 1
    finally:
        watcher.stop()


def test_root_moved_into_place_is_watched(
    tree: Path, recorder: Recorder, observer_kind: str
) -> None:
    parked = tree.with_name("parked")
    os.rename(tree, parked)
    watcher = make_watcher(tree, recorder, observer_kind)
    watcher.start()
    try:
        assert watcher.watch_count == 1
        os.rename(parked, tree)
        wait_until(lambda: watcher.watched_models() == {SLUG, "other_model"}, what="watches")
        wait_until(lambda: recorder.root_changes >= 1, what="the root change")
        shutil.rmtree(tree / SLUG / "app1")
        wait_until(lambda: recorder.seen(AppGone(AppKey(SLUG, 1))), what="a hint")
    finally:
        watcher.stop()


def test_symlinked_root_is_watched_where_it_leads(
    tmp_path: Path, recorder: Recorder, observer_kind: str
) -> None:
    volume = tmp_path / "volume_a"
    (volume / SLUG / "app1").mkdir(parents=True)
    root = tmp_path / "generated" / "apps"
    root.parent.mkdir()
    root.symlink_to(volume)  # the root is a link to a mounted volume
    watcher = make_watcher(root, recorder, observer_kind)
    watcher.start()
    try:
        (root / "new_model" / "app2").mkdir(parents=True)
        wait_until(lambda: "new_model" in watcher.watched_models(), what="the new model's watch")
        shutil.rmtree(root / SLUG)
        wait_until(lambda: recorder.seen(ModelGone(SLUG)), what="the model's removal")

        other = tmp_path / "volume_b"  # re-pointed, as ``ln -sfn volume_b apps`` does
        (other / "third_model" / "app3").mkdir(parents=True)
        link = root.with_name("apps.tmp")
        link.symlink_to(other)
        before = recorder.root_changes
        os.replace(link, root)
        wait_until(
            lambda: recorder.root_changes > before
            and watcher.watched_models() == {"third_model"},
            what="watches on the new volume",
        )
        shutil.rmtree(root / "third_model" / "app3")
        wait_until(lambda: recorder.seen(AppGone(AppKey("third_model", 3))), what="a hint")
        assert ModelGone(SLUG) in recorder.hints
        assert recorder.hints[-1] == AppGone(AppKey("third_model", 3))
        assert watcher.watched_models() == {"third_model"}
    finally:
        watcher.stop()


def test_repair_restores_a_lost_model_watch(
    watcher: Watcher, tree: Path, recorder: Recorder
) -> None:
    watcher.forget_model(SLUG)  # as if a race between two threads had lost it
    assert watcher.watch_count == 3
    assert watcher.repair() == 1
    assert SLUG in watcher.watched_models()
    assert watcher.repair() == 0
    shutil.rmtree(tree / SLUG / "app3")
    wait_until(lambda: recorder.seen(AppGone(AppKey(SLUG, 3))), what="a hint")


def test_rewatch_from_another_thread_while_events_flow_does_not_deadlock(
    tree: Path, recorder: Recorder
) -> None:
    # The service's monitor re-watches the root while watchdog dispatches events that add and
    # drop model watches: the two must not wait on each other's lock.
    watcher = make_watcher(tree, recorder)
    watcher.start()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            watcher.forget_root()
            watcher.rewatch()

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for number in range(400):
            model = tree / f"churn{number % 7}"
            (model / "app1").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(model)
    finally:
        stop.set()
        thread.join(timeout=5)
    alive = thread.is_alive()
    if not alive:
        watcher.stop()
    assert not alive, "the re-watching thread is stuck: lock-order deadlock"


# -- overflow ---------------------------------------------------------------------------------


def test_watchdogs_own_overflow_report_reaches_on_overflow(
    tree: Path, recorder: Recorder
) -> None:
    watcher = make_watcher(tree, recorder)
    watcher.start()
    try:
        # The kernel's IN_Q_OVERFLOW goes through watchdog's own handling (which logs it and
        # carries on); the adapter must notice.
        overflow = InotifyEvent(WatchDescriptor(-1), InotifyConstants.IN_Q_OVERFLOW, 0, b"")
        watcher._observer._inotify_fd.handle_event(overflow)  # type: ignore[union-attr]
        assert recorder.overflows == 1
    finally:
        watcher.stop()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed")
    assert recorder.overflows == 1, "a stopped watcher must not listen any more"


def test_inject_overflow(watcher: Watcher, recorder: Recorder) -> None:
    watcher.inject_overflow()
    assert recorder.overflows == 1


def test_auto_observer_is_native_on_a_local_filesystem(tmp_path: Path) -> None:
    assert choose_observer_kind("auto", tmp_path) in ("native", "polling")
    assert choose_observer_kind("polling", tmp_path) == "polling"
    assert choose_observer_kind("native", tmp_path) == "native"
