"""The reactor alone: hints in, verified removals out, through a real store on SQLite.

No watcher here: the tests hand the reactor its hints, so they can script the database's
failures and the directory's returns exactly where the reactor must cope with them.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    OTHER_SLUG,
    SLUG,
    ScriptedStore,
    SeededApp,
    app_state,
    assert_removed,
    assert_untouched,
    has_row,
    init_database,
    seed_apps,
    wait_until,
)
from sqlalchemy.engine import Engine

from fswatch_sync import db, signals
from fswatch_sync.hints import AppGone, ModelGone
from fswatch_sync.layout import AppKey
from fswatch_sync.reactor import Reactor
from fswatch_sync.stats import Stats
from fswatch_sync.store import Store

KEYS = [AppKey(SLUG, n) for n in (1, 2, 3, 4, 5)] + [AppKey(OTHER_SLUG, 1)]


class Calls:
    def __init__(self) -> None:
        self.sweeps: list[str] = []
        self.unusable: list[str] = []


@pytest.fixture
def apps(probe: Engine, apps_root: Path) -> dict[AppKey, SeededApp]:
    return seed_apps(probe, apps_root, KEYS)


@pytest.fixture
def store(url: str) -> Iterator[ScriptedStore]:
    engine = db.create_engine(url)
    yield ScriptedStore(engine)
    engine.dispose()


@pytest.fixture
def calls() -> Calls:
    return Calls()


def make_reactor(
    store: Store, root: Path, calls: Calls, *, settle: float = 0.005, max_pending: int = 1000
) -> Reactor:
    return Reactor(
        store,
        root,
        sender="test-reactor",
        stats=Stats(),
        request_sweep=calls.sweeps.append,
        root_unusable=calls.unusable.append,
        settle_seconds=settle,
        max_pending=max_pending,
    )


@contextmanager
def running(reactor: Reactor) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=reactor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        reactor.wake()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the reactor did not stop"


def test_absent_directory_is_removed_present_one_kept(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    gone, back = apps[KEYS[0]], apps[KEYS[1]]
    shutil.rmtree(gone.path)
    shutil.rmtree(back.path)
    back.path.mkdir()  # deleted and regenerated before the reactor looked
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):
        reactor.submit(AppGone(back.key))
        reactor.submit(AppGone(gone.key))
        wait_until(lambda: reactor.stats.get("tasks_cancelled") == 2, what="the removal")
    assert_removed(probe, gone)
    assert_untouched(probe, back)
    assert store.calls == [[gone.key]], "the present app must not even reach the store"
    assert reactor.stats.get("apps_removed") == 1
    assert reactor.stats.get("tasks_cancelled") == 2


def test_directory_back_between_the_check_and_the_lock_keeps_its_row(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    app, other = apps[KEYS[2]], apps[KEYS[3]]
    shutil.rmtree(app.path)
    shutil.rmtree(other.path)
    store.before = lambda _batch: app.path.mkdir()  # regenerated after the reactor's look
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):
        reactor.submit(AppGone(app.key))
        reactor.submit(AppGone(other.key))
        wait_until(lambda: not has_row(probe, other.key), what="the other app's removal")
    assert {a.key: app_state(probe, a) for a in (app, other)} == {
        app.key: "untouched", other.key: "removed"
    }


def test_model_gone_removes_every_row_of_that_model_whose_directory_is_gone(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    for key in KEYS[:4]:
        shutil.rmtree(apps[key].path)
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):
        reactor.submit(ModelGone(SLUG))
        wait_until(
            lambda: not any(has_row(probe, key) for key in KEYS[:4]), what="the model's apps"
        )
    # app5's directory is still there; the last key is another model's app
    assert {key: app_state(probe, apps[key]) for key in KEYS[:6]} == {
        **dict.fromkeys(KEYS[:4], "removed"), KEYS[4]: "untouched", KEYS[5]: "untouched"
    }


def test_a_burst_is_one_batch(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    for key in KEYS[:4]:
        shutil.rmtree(apps[key].path)
    reactor = make_reactor(store, apps_root, calls, settle=0.2)
    with running(reactor):
        for key in KEYS[:4]:
            reactor.submit(AppGone(key))
        wait_until(lambda: not any(has_row(probe, k) for k in KEYS[:4]), what="the burst")
    assert store.calls == [sorted(KEYS[:4])]


def test_failing_database_keeps_the_hints_and_applies_them_later(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    first, second = apps[KEYS[0]], apps[KEYS[5]]
    shutil.rmtree(first.path)
    shutil.rmtree(second.path)
    store.failures_left = 3
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):
        reactor.submit(AppGone(first.key))
        wait_until(lambda: len(store.calls) >= 2, what="a retry")
        reactor.submit(AppGone(second.key))  # arrives while the database is still failing
        wait_until(
            lambda: not has_row(probe, first.key) and not has_row(probe, second.key),
            what="both removals once the database is back",
        )
    assert_removed(probe, first)
    assert_removed(probe, second)
    assert len(store.calls) == 4
    assert all(first.key in batch for batch in store.calls), "a failed hint was forgotten"
    assert reactor.stats.get("errors") == 3
    assert calls.sweeps == []


def test_committed_batches_are_announced_and_only_the_rest_retried(
    url: str, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp], calls: Calls
) -> None:
    engine = db.create_engine(url)
    store = ScriptedStore(engine, batch_size=2)
    store.fail_on_calls = {2}  # the second batch fails once
    gone = KEYS[:5]
    for key in gone:
        shutil.rmtree(apps[key].path)
    announced: list[AppKey] = []

    def on_removed(sender: Any, *, key: AppKey, **_extra: Any) -> None:
        announced.append(key)

    reactor = make_reactor(store, apps_root, calls)
    try:
        with signals.app_removed.connected_to(on_removed, sender="test-reactor"), running(
            reactor
        ):
            for key in gone:
                reactor.submit(AppGone(key))
            wait_until(lambda: not any(has_row(probe, k) for k in gone), what="all removals")
            wait_until(lambda: len(announced) == 5, what="every removal announced")
    finally:
        engine.dispose()
    assert sorted(announced) == sorted(gone)
    assert store.calls[0] == sorted(gone)[:2]
    # After the failure the first (committed) batch is not retried.
    assert sorted(gone)[0] not in [k for batch in store.calls[1:] for k in batch]
    for key in gone:
        assert_removed(probe, apps[key])


def test_queue_bound_falls_back_to_a_sweep(
    store: ScriptedStore, apps_root: Path, calls: Calls
) -> None:
    reactor = make_reactor(store, apps_root, calls, max_pending=3)  # not running: nothing drains
    for number in range(3):
        reactor.submit(AppGone(AppKey(SLUG, 100 + number)))
    assert calls.sweeps == []
    assert reactor.pending() == 3
    reactor.submit(AppGone(AppKey(SLUG, 200)))
    assert calls.sweeps == ["overflow"]
    assert reactor.pending() == 0


def test_requeue_past_the_bound_falls_back_to_a_sweep(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    for key in KEYS[:4]:
        shutil.rmtree(apps[key].path)
    store.gate = threading.Event()
    store.failures_left = 1
    reactor = make_reactor(store, apps_root, calls, max_pending=3)
    with running(reactor):
        for key in KEYS[:3]:
            reactor.submit(AppGone(key))
        assert store.entered.wait(timeout=5)  # the reactor holds the three in its batch
        reactor.submit(AppGone(KEYS[3]))  # one more queued: within the bound
        assert calls.sweeps == []
        store.gate.set()  # the batch fails: 3 + 1 would pass the bound
        wait_until(lambda: calls.sweeps == ["overflow"], what="the fallback sweep request")
        assert reactor.pending() == 0
    for key in KEYS[:4]:
        assert has_row(probe, key), "the sweep, not the reactor, handles dropped hints"


def test_missing_root_removes_nothing(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    shutil.rmtree(apps_root)
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):
        reactor.submit(ModelGone(SLUG))
        reactor.submit(AppGone(KEYS[5]))
        wait_until(lambda: calls.unusable == ["root-missing"], what="the root report")
    assert store.calls == []
    for app in apps.values():
        assert_untouched(probe, app)


def test_a_missing_root_holds_only_what_has_rows(
    database_url: str, engine: Engine, apps_root: Path, calls: Calls
) -> None:
    """An app or a model with rows waits for the root; one without rows (a second event of a
    directory already handled) has nothing to wait for. On every backend: the rows are asked of
    the database."""
    init_database(database_url)
    apps = seed_apps(engine, apps_root, KEYS)
    store = ScriptedStore(engine)
    shutil.rmtree(apps_root)
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):
        # Those without rows first: once the others are held, all have been judged.
        reactor.submit(ModelGone("model_without_rows"))
        reactor.submit(AppGone(AppKey(SLUG, 99)))
        reactor.submit(ModelGone(SLUG))
        reactor.submit(AppGone(KEYS[5]))
        wait_until(
            lambda: min(reactor.waiting()["models"], reactor.waiting()["apps"]) >= 1,
            what="a model and an app held back",
        )
        held = reactor.waiting()
    assert calls.unusable[:1] == ["root-missing"]
    assert (held["apps"], held["models"]) == (1, 1)
    assert held["sample"] == [str(KEYS[5]), f"{SLUG}/*"]
    assert store.calls == []
    for app in apps.values():
        assert_untouched(engine, app)


def test_root_without_any_app_directory_removes_nothing(
    store: ScriptedStore, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp],
    calls: Calls,
) -> None:
    shutil.rmtree(apps_root / SLUG)
    shutil.rmtree(apps_root / OTHER_SLUG)
    (apps_root / SLUG).mkdir()  # an empty model directory is not an app
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):
        reactor.submit(ModelGone(OTHER_SLUG))
        wait_until(lambda: calls.unusable == ["root-empty"], what="the empty-root report")
    assert store.calls == []
    for app in apps.values():
        assert_untouched(probe, app)


def test_stop_is_prompt_while_backing_off(
    store: ScriptedStore, apps_root: Path, apps: dict[AppKey, SeededApp], calls: Calls
) -> None:
    shutil.rmtree(apps[KEYS[0]].path)
    store.failures_left = 1000
    reactor = make_reactor(store, apps_root, calls)
    with running(reactor):  # the context's exit asserts the thread ends within 5 s
        reactor.submit(AppGone(KEYS[0]))
        wait_until(lambda: len(store.calls) >= 3, what="a few failed tries")
    assert reactor.pending() == 1, "the unapplied hint is still queued"
