"""The collector is paused for the span of a write transaction, and given back as it was."""

from __future__ import annotations

import gc
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from fswatch_sync import db, gcpause
from fswatch_sync.store import Store


@pytest.fixture(autouse=True)
def _collector_back() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_paused_inside_and_back_after() -> None:
    gc.enable()
    with gcpause.held():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_host_disabled_stays_disabled() -> None:
    gc.disable()
    with gcpause.held():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_back_only_when_the_last_holder_leaves() -> None:
    gc.enable()
    inside = threading.Event()
    leave = threading.Event()

    def other() -> None:
        with gcpause.held():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    with gcpause.held():
        pass
    assert not gc.isenabled(), "the other thread's transaction is still open"
    leave.set()
    thread.join(10)
    assert gc.isenabled()


def test_back_after_a_failed_block() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), gcpause.held():
        raise RuntimeError("refused")
    assert gc.isenabled()


def test_a_write_transaction_of_the_store_holds_it(tmp_path: Path) -> None:
    engine = db.create_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    try:
        store = Store(engine)
        store.init_db()
        apps = store.host.apps  # reflected before: only the write transaction is watched
        gc.enable()
        seen: list[tuple[str, bool]] = []
        # BEGIN (SQLite's wait for the write lock) comes before the pause; COMMIT inside it.
        sa.event.listen(engine, "begin", lambda conn: seen.append(("begin", gc.isenabled())))
        sa.event.listen(engine, "commit", lambda conn: seen.append(("commit", gc.isenabled())))
        with store._write() as connection:
            seen.append(("body", gc.isenabled()))
            connection.execute(sa.insert(apps).values(model_slug="m", app_number=1))
        assert seen == [("begin", True), ("body", False), ("commit", False)]
        assert gc.isenabled()
        with engine.connect() as connection:
            count = connection.execute(
                sa.select(sa.func.count()).select_from(store.host.apps)
            ).scalar_one()
        assert count == 1
    finally:
        engine.dispose()


def test_the_read_of_every_app_row_holds_it(tmp_path: Path) -> None:
    engine = db.create_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    try:
        store = Store(engine)
        store.init_db()
        apps = store.host.apps
        with engine.begin() as connection:
            connection.execute(
                sa.insert(apps), [{"model_slug": "m", "app_number": n} for n in range(1, 3001)]
            )
        gc.enable()
        seen: list[bool] = []

        def watch(connection: object, cursor: object, statement: str, *rest: object) -> None:
            if apps.name in statement:
                seen.append(gc.isenabled())

        sa.event.listen(engine, "after_cursor_execute", watch)
        rows = store.app_rows()
        assert seen == [False]  # the one read, made and fetched with the collector paused
        assert gc.isenabled()
        assert sorted(rows)[:2] == [("m", 1, 1, 0), ("m", 2, 1, 0)]
        assert len(rows) == 3000
    finally:
        engine.dispose()


def test_the_sweep_surveys_the_tree_with_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan and the read of every app row run with the collector paused; it is back for the
    changes that follow (each of their write transactions pausing it again)."""
    from fswatch_sync import sweep_tree
    from fswatch_sync.layout import scan_tree as scan
    from fswatch_sync.settings import Settings
    from fswatch_sync.sweep import Sweeper

    root = tmp_path / "apps"
    (root / "m" / "app1").mkdir(parents=True)
    engine = db.create_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    try:
        store = Store(engine)
        store.init_db()
        with engine.begin() as connection:
            connection.execute(
                sa.insert(store.host.apps), [{"model_slug": "m", "app_number": n} for n in (1, 2)]
            )
        seen: dict[str, bool] = {}

        def watched_scan(*args: object) -> object:
            seen["scan"] = gc.isenabled()
            return scan(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(sweep_tree, "scan_tree", watched_scan)
        remove = Store.remove_apps

        def watched_remove(self: Store, *args: object, **kwargs: object) -> object:
            seen["removal"] = gc.isenabled()
            return remove(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Store, "remove_apps", watched_remove)
        gc.enable()
        settings = Settings(root=root, database_url=str(engine.url), max_delete_fraction=1.0)
        report = Sweeper(store, settings, instance_id="test").run(force=True)
        assert seen == {"scan": False, "removal": True}
        assert gc.isenabled()
        assert report.orphan_apps == 1
    finally:
        engine.dispose()


def test_a_process_forked_while_it_is_held_gets_the_collector_back() -> None:
    gc.enable()
    reading, writing = os.pipe()
    with gcpause.held():
        with warnings.catch_warnings():
            # Python 3.12+ warns of fork() beside other threads; the child only writes a byte.
            warnings.simplefilter("ignore", DeprecationWarning)
            child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            os.write(writing, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        assert not gc.isenabled()  # still held in the parent
    os.close(writing)
    _, status = os.waitpid(child, 0)
    answer = os.read(reading, 1)
    os.close(reading)
    assert (os.waitstatus_to_exitcode(status), answer) == (0, b"1")
    assert gc.isenabled()
