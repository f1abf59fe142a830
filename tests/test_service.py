"""A running Service against real directories, a real watchdog observer and a real database.

Every removal kind the SPEC lists is made with the ordinary file-system calls a user's ``rm``,
``rmdir`` and ``mv`` make; each test then waits (polling a separate database connection) for the
row to go and checks the whole outcome: tasks cancelled with a time and a message, the completed
task untouched, every other app untouched, and the journal naming the reactor as the source.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    OTHER_SLUG,
    SLUG,
    ScriptedStore,
    SeededApp,
    add_app_row,
    app_keys,
    app_state,
    assert_removed,
    assert_untouched,
    finished_sweeps,
    has_row,
    init_database,
    instance_rows,
    journal_sources,
    make_settings,
    probe_engine,
    running_service,
    seed_app,
    seed_apps,
    sqlite_url,
    stays_false,
    sweep_rows,
    wait_until,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from fswatch_sync import db, records, signals
from fswatch_sync.layout import AppKey
from fswatch_sync.records import Lease
from fswatch_sync.schema import sweeps_table
from fswatch_sync.service import STOP_TOTAL_SECONDS, Service
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

A1, A2, A5 = AppKey(SLUG, 1), AppKey(SLUG, 2), AppKey(SLUG, 5)
B1, B2 = AppKey(OTHER_SLUG, 1), AppKey(OTHER_SLUG, 2)
ALL = (A1, A2, A5, B1, B2)


@pytest.fixture
def apps(probe: Engine, apps_root: Path) -> dict[AppKey, SeededApp]:
    return seed_apps(probe, apps_root, ALL)


@pytest.fixture
def service(apps_root: Path, url: str, apps: dict[AppKey, SeededApp]) -> Iterator[Service]:
    with running_service(make_settings(apps_root, url)) as started:
        yield started


def removed_by_reactor(
    probe: Engine, apps: dict[AppKey, SeededApp], gone: tuple[AppKey, ...]
) -> dict[AppKey, str]:
    """Wait for every app in ``gone`` to lose its row; then every app's state (see app_state),
    with ``"swept"`` under the key None if a sweep ran (the reactor alone must do this)."""
    wait_until(lambda: not any(has_row(probe, key) for key in gone), what=f"{gone} removed")
    states: dict[AppKey, str] = {key: app_state(probe, app) for key, app in apps.items()}
    if sweep_rows(probe):
        states[AppKey("<sweep>", 0)] = "swept"
    return states


def expected(apps: dict[AppKey, SeededApp], gone: tuple[AppKey, ...]) -> dict[AppKey, str]:
    return {key: "removed" if key in gone else "untouched" for key in apps}


# -- every removal kind --------------------------------------------------------------------------


def test_rm_rf_of_an_app_directory(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    shutil.rmtree(apps[A5].path)
    assert removed_by_reactor(probe, apps, (A5,)) == expected(apps, (A5,))


def test_every_removal_kind_on_every_backend(
    database_url: str, apps_root: Path, tmp_path: Path
) -> None:
    """Each kind in turn in one running service; the reactor acts on a row younger than the
    grace and is not held back by the sweep's mass-deletion guard (6 of 7 rows go)."""
    init_database(database_url)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with probe_engine(database_url) as probe:
        apps = seed_apps(probe, apps_root, (*ALL, AppKey(SLUG, 3)))
        young = seed_app(probe, apps_root, AppKey(SLUG, 7), empty=True, age=timedelta(0))
        apps[young.key] = young
        steps: list[tuple[tuple[AppKey, ...], Callable[[], object]]] = [
            ((A2,), lambda: shutil.rmtree(apps[A2].path)),
            ((young.key,), lambda: os.rmdir(young.path)),
            ((A5,), lambda: os.rename(apps[A5].path, elsewhere / "app5")),
            ((A1,), lambda: os.rename(apps[A1].path, apps[A1].path.with_name("old-app1"))),
            ((B1, B2), lambda: shutil.rmtree(apps_root / OTHER_SLUG)),
        ]
        gone: tuple[AppKey, ...] = ()
        settings = make_settings(apps_root, database_url, max_delete_fraction=0.1)
        with running_service(settings):
            for keys, remove in steps:
                remove()
                gone += keys
                assert removed_by_reactor(probe, apps, gone) == expected(apps, gone), keys


def test_rmdir_of_an_empty_app_directory(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    empty = seed_app(probe, apps_root, AppKey(SLUG, 7), empty=True)
    apps = {**apps, empty.key: empty}
    with running_service(make_settings(apps_root, url)):
        os.rmdir(empty.path)
        assert removed_by_reactor(probe, apps, (empty.key,)) == expected(apps, (empty.key,))


def test_app_directory_moved_out_of_the_root(
    service: Service, tmp_path: Path, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(apps[A5].path, elsewhere / "app5")
    assert removed_by_reactor(probe, apps, (A5,)) == expected(apps, (A5,))
    assert (elsewhere / "app5" / "src" / "main.py").is_file(), "the tool must not touch disk"


@pytest.mark.parametrize("new_name", ["app5.old", "old-app5", "App5"])
def test_app_directory_renamed_so_it_no_longer_matches(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp], new_name: str
) -> None:
    os.rename(apps[A5].path, apps[A5].path.with_name(new_name))
    assert removed_by_reactor(probe, apps, (A5,)) == expected(apps, (A5,))


def test_whole_model_directory_removed(
    service: Service, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    shutil.rmtree(apps_root / SLUG)
    assert removed_by_reactor(probe, apps, (A1, A2, A5)) == expected(apps, (A1, A2, A5))


def test_model_directory_created_after_start_is_watched(
    service: Service, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    (apps_root / "mistral_large").mkdir()
    wait_until(
        lambda: "mistral_large" in service.watcher.watched_models(), what="the new model's watch"
    )
    late = seed_app(probe, apps_root, AppKey("mistral_large", 3))
    apps = {**apps, late.key: late}
    shutil.rmtree(late.path)
    assert removed_by_reactor(probe, apps, (late.key,)) == expected(apps, (late.key,))


def test_model_directory_created_with_its_apps_in_one_go(
    service: Service, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    # mkdir -p: the app directory may exist before the model directory's watch does.
    late = seed_app(probe, apps_root, AppKey("mistral_large", 4))
    apps = {**apps, late.key: late}
    wait_until(
        lambda: "mistral_large" in service.watcher.watched_models(), what="the new model's watch"
    )
    shutil.rmtree(late.path)
    assert removed_by_reactor(probe, apps, (late.key,)) == expected(apps, (late.key,))


def test_model_directory_renamed_removes_its_apps_and_watches_the_new_name(
    service: Service, apps_root: Path, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    os.rename(apps_root / OTHER_SLUG, apps_root / "renamed_model")
    assert removed_by_reactor(probe, apps, (B1, B2)) == expected(apps, (B1, B2))
    wait_until(lambda: "renamed_model" in service.watcher.watched_models(), what="a watch")
    assert OTHER_SLUG not in service.watcher.watched_models()
    moved = seed_app(probe, apps_root, AppKey("renamed_model", 1))
    shutil.rmtree(moved.path)
    wait_until(lambda: not has_row(probe, moved.key), what="removal under the new name")
    assert_removed(probe, moved)


# -- the re-check ----------------------------------------------------------------------------------


def test_deleted_and_recreated_directory_keeps_its_row(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    shutil.rmtree(apps[A5].path)
    apps[A5].path.mkdir()  # regenerated at once
    # A later removal in the same model directory is queued behind A5's hint: once it is
    # handled, A5's hint has been looked at too.
    shutil.rmtree(apps[A1].path)
    wait_until(lambda: not has_row(probe, A1), what="the later removal")
    assert_untouched(probe, apps[A5])
    assert journal_sources(probe, A5) == []
    assert_removed(probe, apps[A1])


# -- the root --------------------------------------------------------------------------------------


class Degraded:
    """Records watch_degraded signals sent by one service."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, sender: Any, *, reason: str, **_extra: Any) -> None:
        self.reasons.append(reason)


def test_root_removed_then_back(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    degraded = Degraded()
    # rm -rf removes the app directories one by one before the root: the reactor cannot tell
    # that from apps being deleted until the root is gone, unless the whole rm falls within one
    # settle window (as the unmount of a volume does).
    settings = make_settings(apps_root, url, settle_ms=300.0)
    with running_service(settings) as service, \
            signals.watch_degraded.connected_to(degraded, sender=service):
        shutil.rmtree(apps_root)
        wait_until(lambda: "root-missing" in degraded.reasons, what="watch_degraded root-missing")
        assert service.stats.get("watch_state") == "root-missing"
        for app in apps.values():
            assert_untouched(probe, app)

        for key in ALL:  # restored one directory at a time, as a copy does
            (apps_root / key.model_slug / f"app{key.app_number}").mkdir(parents=True)
        wait_until(lambda: finished_sweeps(probe, "root-back"), what="the root-back sweep")
        assert journal_sources(probe, A2) == []
        assert service.stats.get("watch_state") == "watching"
        assert degraded.reasons[-1] == "recovered"
        assert finished_sweeps(probe, "root-back")[0]["outcome"] == "ok"
        for app in apps.values():
            assert_untouched(probe, app)

        shutil.rmtree(apps[A2].path)  # watched again
        wait_until(lambda: not has_row(probe, A2), what="a removal after the root came back")
        assert_removed(probe, apps[A2])
        assert_untouched(probe, apps[B1])


def test_root_back_sweep_waits_for_the_root_to_stop_filling(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    parked = apps_root.with_name("parked")
    degraded = Degraded()
    with running_service(make_settings(apps_root, url)) as service, \
            signals.watch_degraded.connected_to(degraded, sender=service):
        os.rename(apps_root, parked)  # unmounted
        wait_until(lambda: "root-missing" in degraded.reasons, what="root-missing")
        for key in (A1, A2, A5):  # a restore has copied back three apps of five so far
            (apps_root / key.model_slug / f"app{key.app_number}").mkdir(parents=True)
        wait_until(lambda: "recovered" in degraded.reasons, what="the root's return")
        # The sweep waits until the count of app directories has held still for
        # ROOT_SETTLE_SECONDS (1 s); a sweep now would take B1 and B2 for orphans.
        assert stays_false(lambda: sweep_rows(probe), 0.4), "swept a root still filling"
        for key in (B1, B2):  # ... and copies the rest
            (apps_root / key.model_slug / f"app{key.app_number}").mkdir(parents=True)
        wait_until(lambda: finished_sweeps(probe, "root-back"), what="the root-back sweep")
        (sweep,) = finished_sweeps(probe, "root-back")
        assert (sweep["outcome"], sweep["orphan_apps"]) == ("ok", 0)
        for app in apps.values():
            assert_untouched(probe, app)


def test_root_link_re_pointed_to_another_volume_is_swept_and_watched(
    tmp_path: Path, url: str, probe: Engine
) -> None:
    volume_a, volume_b = tmp_path / "volume_a", tmp_path / "volume_b"
    volume_a.mkdir()
    root = tmp_path / "generated" / "apps"
    root.parent.mkdir()
    root.symlink_to(volume_a)
    apps = seed_apps(probe, root, ALL)
    for key in (A1, A2, A5, B1):  # the new volume lacks B2
        (volume_b / key.model_slug / f"app{key.app_number}").mkdir(parents=True)
    with running_service(make_settings(root, url)):
        link = root.with_name("apps.tmp")
        link.symlink_to(volume_b)
        os.replace(link, root)  # ln -sfn volume_b apps
        wait_until(lambda: finished_sweeps(probe, "root-back"), what="a sweep of the new volume")
        assert not has_row(probe, B2)
        assert journal_sources(probe, B2) == ["sweep"]
        shutil.rmtree(root / SLUG / "app5")  # watched on the new volume
        wait_until(lambda: not has_row(probe, A5), what="a removal on the new volume")
        assert journal_sources(probe, A5) == ["reactor"]
        for key in (A1, A2, B1):
            assert_untouched(probe, apps[key])


def test_root_emptied_by_removing_every_model_is_a_real_removal(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    # The root is still the directory watched (an unmount shows another one: test_treehealth);
    # the kernel reported each model directory removed, so every app of it is gone.
    settings = make_settings(apps_root, url, settle_ms=300.0)
    with running_service(settings) as service:
        shutil.rmtree(apps_root / SLUG)
        shutil.rmtree(apps_root / OTHER_SLUG)
        wait_until(lambda: not app_keys(probe), what="every row removed")
        wait_until(lambda: service.reactor.pending() == 0, what="the queue to drain")
        assert service.stats.get("watch_state") == "watching"
        for app in apps.values():
            assert_removed(probe, app)


def test_root_missing_at_start_then_created(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    parked = apps_root.with_name("parked")
    os.rename(apps_root, parked)
    degraded = Degraded()
    with signals.watch_degraded.connected_to(degraded), running_service(
        make_settings(apps_root, url), initial_sweep=True
    ) as service:
        wait_until(lambda: finished_sweeps(probe, "startup"), what="the refused startup sweep")
        assert finished_sweeps(probe, "startup")[0]["outcome"] == "refused"
        assert service.stats.get("watch_state") == "root-missing"
        assert "root-missing" in degraded.reasons
        os.rename(parked, apps_root)  # mounted
        wait_until(lambda: finished_sweeps(probe, "root-back"), what="the root-back sweep")
        shutil.rmtree(apps[B2].path)
        wait_until(lambda: not has_row(probe, B2), what="a removal once the root is there")
        for key, app in apps.items():
            if key != B2:
                assert_untouched(probe, app)


# -- missed events -------------------------------------------------------------------------------


def test_overflow_at_the_adapter_runs_a_full_sweep(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    orphan = AppKey(SLUG, 40)  # a row whose directory vanished without any event
    add_app_row(probe, orphan, db.utcnow() - timedelta(hours=2))
    degraded = Degraded()
    with signals.watch_degraded.connected_to(degraded, sender=service):
        service.watcher.inject_overflow()
        wait_until(lambda: finished_sweeps(probe, "overflow"), what="the overflow sweep")
    (sweep,) = finished_sweeps(probe, "overflow")
    assert sweep["outcome"] == "ok"
    assert sweep["orphan_apps"] == 1
    assert not has_row(probe, orphan)
    assert journal_sources(probe, orphan) == ["sweep"]
    assert degraded.reasons == ["overflow"]
    for app in apps.values():
        assert_untouched(probe, app)


def test_request_sweep_and_sweep_now(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    service.request_sweep("manual")
    wait_until(lambda: finished_sweeps(probe, "manual"), what="the requested sweep")
    report = service.sweep_now(trigger="manual")
    assert report.orphan_apps == 0
    assert [row["trigger"] for row in finished_sweeps(probe)] == ["manual", "manual"]
    assert service.stats.get("sweeps") == 2


# -- observers, status, lifecycle ----------------------------------------------------------------


def test_polling_observer_sees_rm_rf(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    settings = make_settings(apps_root, url, observer="polling", polling_interval_seconds=0.05)
    with running_service(settings) as service:
        assert service.observer_kind == "polling"
        shutil.rmtree(apps[B1].path)
        assert removed_by_reactor(probe, apps, (B1,)) == expected(apps, (B1,))


def test_heartbeat_and_stop_are_recorded(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    (row,) = instance_rows(probe)
    assert row["instance_id"] == service.instance_id
    assert row["state"] == "watching"
    assert row["stopped_at"] is None
    status = service.status()
    assert status["running"] is True
    assert status["stats"]["watches"] == 4  # the root's parent, the root, two model dirs
    service.stop()
    (row,) = instance_rows(probe)
    assert row["state"] == "stopped"
    assert row["stopped_at"] is not None
    assert not service.running
    assert not [t for t in service._threads if t.is_alive()]


def test_start_twice_is_refused(service: Service) -> None:
    with pytest.raises(RuntimeError):
        service.start()


def test_stop_is_bounded_while_the_database_hangs(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = db.create_engine(url)
    store = ScriptedStore(engine)
    store.gate = threading.Event()  # remove_apps blocks: the database stopped answering
    hang = threading.Event()
    service = Service(make_settings(apps_root, url), store=store, initial_sweep=False)
    service.start()
    try:
        shutil.rmtree(apps[A5].path)
        assert store.entered.wait(timeout=10), "the reactor never reached the database"
        monkeypatch.setattr(service, "_heartbeat", lambda state=None: hang.wait(30))
        threads = list(service._threads)
        began = time.monotonic()
        service.stop()
        took = time.monotonic() - began
    finally:
        store.gate.set()
        hang.set()
    assert took < STOP_TOTAL_SECONDS + 0.5, f"stop took {took:.1f}s"
    assert not service.running
    wait_until(lambda: not has_row(probe, A5), what="the batch to finish once the gate opens")
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive(), thread.name
    engine.dispose()


def test_a_stopped_service_can_start_again(
    service: Service, probe: Engine, apps: dict[AppKey, SeededApp]
) -> None:
    service.stop()
    shutil.rmtree(apps[A1].path)  # while stopped: no watcher
    service.start()
    shutil.rmtree(apps[B2].path)
    wait_until(lambda: not has_row(probe, B2), what="a removal after the restart")
    assert_removed(probe, apps[B2])
    assert has_row(probe, A1), "nothing watched while stopped; the next sweep finds it"


def test_periodic_sweeps_survive_a_database_error_in_the_sweeper(
    apps_root: Path, url: str, probe: Engine, apps: dict[AppKey, SeededApp],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures: list[int] = []

    def unreachable(*_args: Any, **_kwargs: Any) -> list[dict[str, Any]]:
        failures.append(1)
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("unable to open database"))

    # Is another instance's sweep recent? The database cannot say right now.
    monkeypatch.setattr(records, "recent_sweeps", unreachable)
    settings = make_settings(apps_root, url, interval_seconds=0.05, sweep_jitter_fraction=0.0)
    with running_service(settings) as service:
        wait_until(lambda: len(failures) >= 3, what="several periodic turns")
        (sweeper,) = [t for t in service._threads if t.name == "fswatch-sync-sweeper"]
        assert sweeper.is_alive(), "the sweeper thread died"
        wait_until(lambda: finished_sweeps(probe, "periodic"), what="a periodic sweep")
    for app in apps.values():
        assert_untouched(probe, app)


def test_workers_started_together_sweep_once(tmp_path: Path, apps_root: Path) -> None:
    """A start-up sweep that found the lease taken is skipped once another instance swept."""
    url = sqlite_url(tmp_path)
    init_database(url)
    settings = make_settings(apps_root, url, lease_seconds=30.0)
    engine = db.create_engine(url)
    other = Lease(engine, "other-worker", duration_seconds=30.0)
    assert other.try_acquire()
    service = Service(settings, initial_sweep=True)
    service.start()
    try:
        # The other worker sweeps under the lease it already holds, then lets it go.
        Sweeper(Store(engine), settings, instance_id="other-worker").run()
        wait_until(lambda: service.stats.get("sweeps_skipped") == 1, timeout=10)
        with engine.connect() as connection:
            mine = connection.execute(
                sa.select(sa.func.count())
                .select_from(sweeps_table)
                .where(sweeps_table.c.instance_id == service.instance_id)
            ).scalar_one()
        assert mine == 0
    finally:
        service.stop()
        engine.dispose()
