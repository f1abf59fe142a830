"""Can the tree be trusted? The decisions of fswatch_sync.treehealth, pure and for real.

The real situations mount a tmpfs (the test runs as root on this machine): over one model
directory (its apps hidden, or a volume of its own), over the root (what an unmounted volume's
mount point looks like). Each is checked through the sweep, the reactor of a running service and
the command line, asserting on the database.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    APPS,
    GONE_MESSAGE,
    TASKS,
    app_keys,
    app_state,
    has_row,
    init_database,
    make_settings,
    naive,
    running_service,
    seed_app,
    stays_false,
    wait_until,
)
from sqlalchemy.engine import Engine

from fswatch_sync import db, treehealth
from fswatch_sync.errors import SweepRefused
from fswatch_sync.hints import AppGone, Hint, ModelGone
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table, tree_table
from fswatch_sync.service import Service
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.treehealth import Look, Seen
from fswatch_sync.watcher import Watcher

SLUG, OTHER = "openai_gpt-4", "anthropic_claude-3"
ROOT_ID, MOUNT_ID = (100, 2), (200, 1)


# -- the rules, pure ------------------------------------------------------------------------------


def test_judge_root() -> None:
    here = Look(Seen.DIRECTORY, ROOT_ID)
    judge = treehealth.judge_root
    assert judge(Look(Seen.ABSENT), apps_seen=False, rows_exist=True, known=ROOT_ID) == (
        "root-missing"
    )
    assert judge(Look(Seen.ABSENT), apps_seen=False, rows_exist=False, known=None) == (
        "root-missing"
    )
    assert judge(here, apps_seen=True, rows_exist=True, known=None) is None
    assert judge(here, apps_seen=False, rows_exist=False, known=None) is None
    # Empty while rows exist: an unmounted volume's mount point, unless it is the directory
    # seen holding apps (then its last apps were really deleted), or the operator says so.
    assert judge(here, apps_seen=False, rows_exist=True, known=None) == "root-empty"
    assert judge(here, apps_seen=False, rows_exist=True, known=MOUNT_ID) == "root-empty"
    assert judge(here, apps_seen=False, rows_exist=True, known=ROOT_ID) is None
    assert judge(here, apps_seen=False, rows_exist=True, known=None, allow_empty=True) is None


def test_judge_model() -> None:
    def judge(model: Look, **kwargs: Any) -> str | None:
        values: dict[str, Any] = {
            "root_device": ROOT_ID[0], "apps_seen": True, "rows_exist": True, "known": None
        }
        values.update(kwargs)
        return treehealth.judge_model(model, **values)

    same_device = Look(Seen.DIRECTORY, (ROOT_ID[0], 77))
    mounted = Look(Seen.DIRECTORY, MOUNT_ID)
    assert judge(Look(Seen.ABSENT)) is None  # a removed model directory is a removal
    assert judge(Look(Seen.UNKNOWN)) == "unreadable"
    assert judge(Look(Seen.UNKNOWN), forced=True) == "unreadable"  # forcing cannot tell
    assert judge(same_device) is None
    assert judge(mounted) == "mounted"  # even showing apps: a volume of its own
    assert judge(mounted, apps_seen=False) == "mounted"
    assert judge(mounted, forced=True) is None
    assert judge(same_device, apps_seen=False) == "empty"
    assert judge(same_device, apps_seen=False, known=(ROOT_ID[0], 78)) == "empty"
    assert judge(same_device, apps_seen=False, known=(ROOT_ID[0], 77)) is None
    assert judge(same_device, apps_seen=False, rows_exist=False) is None
    assert judge(same_device, apps_seen=False, forced=True) is None
    assert judge(same_device, apps_seen=False, allow_empty=True) is None
    assert judge(mounted, apps_seen=False, allow_empty=True) == "mounted"


def test_look() -> None:
    def failing(error: int) -> Callable[[Path], os.stat_result]:
        def stat_fn(path: Path) -> os.stat_result:
            raise OSError(error, os.strerror(error), str(path))
        return stat_fn

    assert treehealth.look(Path("x"), follow=False, stat_fn=failing(errno.ENOENT)).seen is (
        Seen.ABSENT
    )
    # A name no directory can carry is absent; one that cannot be examined proves nothing.
    assert treehealth.look(Path("x"), follow=False, stat_fn=failing(errno.ENAMETOOLONG)).seen is (
        Seen.ABSENT
    )
    assert treehealth.look(Path("x"), follow=False, stat_fn=failing(errno.EACCES)).seen is (
        Seen.UNKNOWN
    )
    assert treehealth.look(Path("x"), follow=False, stat_fn=failing(errno.EIO)).seen is (
        Seen.UNKNOWN
    )


class FakeStat:
    """``os.stat`` over a made-up tree: path -> (device, inode) of a directory; else absent."""

    def __init__(self, dirs: dict[Path, tuple[int, int]], files: Iterable[Path] = ()) -> None:
        self.dirs = dirs
        self.files = set(files)

    def __call__(self, path: Path) -> os.stat_result:
        if path in self.dirs:
            device, inode = self.dirs[path]
            return os.stat_result((0o040755, inode, device, 2, 0, 0, 0, 0, 0, 0))
        if path in self.files:
            return os.stat_result((0o100644, 9, 1, 1, 0, 0, 0, 0, 0, 0))
        raise FileNotFoundError(path)


def test_assess_with_a_fake_stat() -> None:
    root = Path("/srv/apps")
    tree = FakeStat(
        {root: ROOT_ID, root / SLUG: (100, 3), root / OTHER: MOUNT_ID, root / "empty": (100, 5)},
        files=[root / ".mounted"],
    )
    present = {AppKey(SLUG, 1), AppKey(OTHER, 1)}
    rows = {SLUG: 2, OTHER: 3, "empty": 1, "gone": 4}

    def assess(**kwargs: Any) -> treehealth.TreeHealth:
        values: dict[str, Any] = {
            "marker": ".mounted", "root_listed": True, "present": present, "unreadable": (),
            "row_slugs": rows, "known": {}, "stat_fn": tree,
        }
        values.update(kwargs)
        return treehealth.assess(root, **values)

    health = assess()
    assert health.root_problem is None
    assert dict(health.untrusted) == {OTHER: "mounted", "empty": "empty"}
    assert health.absent_models == {"gone"}  # removed: its rows are orphans
    assert dict(health.seen_holding_apps) == {None: ROOT_ID, SLUG: (100, 3)}
    assert health.trusts(AppKey(SLUG, 2)) and health.trusts(AppKey("gone", 1))
    assert not health.trusts(AppKey(OTHER, 2))

    assert dict(assess(force_models=[OTHER, "empty"]).untrusted) == {}
    assert dict(assess(known={"empty": (100, 5)}).untrusted) == {OTHER: "mounted"}
    assert assess(marker=".other").root_problem == "root-missing"
    assert assess(root_listed=False).root_problem == "root-missing"
    assert assess(unreadable=[SLUG]).untrusted[SLUG] == "unreadable"
    assert assess(present=set()).root_problem == "root-empty"
    assert assess(present=set(), known={None: ROOT_ID}).root_problem is None
    # The same inode number on another device is another directory.
    assert assess(present=set(), known={None: (101, 2)}).root_problem == "root-empty"
    emptied = assess(present=set(), allow_empty_root=True)
    assert emptied.root_problem is None
    assert dict(emptied.untrusted) == {OTHER: "mounted"}  # a mount is a mount


# -- real mounts --------------------------------------------------------------------------------


@contextmanager
def tmpfs_over(path: Path) -> Iterator[Path]:
    """A fresh, empty tmpfs mounted on ``path`` (created if need be) for the block."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "fswatch-sync-test", str(path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)  # CI runs as root on a machine that allows it
        pytest.skip(reason)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def seed_tree(engine: Engine, root: Path, keys: Iterable[AppKey]) -> None:
    """App rows past the new-app grace, each with its directory, a pending and a running task
    (younger than the stuck timeouts) - in one transaction per table."""
    chosen = list(keys)
    now = db.utcnow()
    for key in chosen:
        (root / key.model_slug / f"app{key.app_number}").mkdir(parents=True, exist_ok=True)
    with engine.begin() as connection:
        connection.execute(sa.insert(APPS), [
            {"model_slug": k.model_slug, "app_number": k.app_number,
             "created_at": naive(now - timedelta(hours=1))} for k in chosen
        ])
        connection.execute(sa.insert(TASKS), [
            {"task_id": f"{k.model_slug}-{k.app_number}-{status}", "target_model": k.model_slug,
             "target_app_number": k.app_number, "status": status,
             "created_at": naive(now - timedelta(minutes=5)),
             "started_at": naive(now - timedelta(minutes=1)) if status == "running" else None}
            for k in chosen for status in ("pending", "running")
        ])


def active_task_keys(engine: Engine) -> set[AppKey]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(TASKS.c.target_model, TASKS.c.target_app_number)
            .where(TASKS.c.status.in_(("pending", "running")))
        ).all()
    return {AppKey(slug, int(number)) for slug, number in rows}


def removed_properly(engine: Engine, keys: Iterable[AppKey], source: str) -> bool:
    """Rows gone, every task of them cancelled with a time and the gone message, journalled."""
    chosen = set(keys)
    if chosen & app_keys(engine):
        return False
    with engine.connect() as connection:
        tasks = connection.execute(sa.select(TASKS)).all()
        journalled = {
            AppKey(slug, int(number))
            for slug, number in connection.execute(
                sa.select(journal_table.c.model_slug, journal_table.c.app_number).where(
                    journal_table.c.action == "app_removed", journal_table.c.source == source
                )
            ).all()
        }
    for task in tasks:
        if AppKey(task.target_model, task.target_app_number) in chosen and (
            task.status != "cancelled"
            or task.completed_at is None
            or GONE_MESSAGE not in (task.error_message or "")
        ):
            return False
    return chosen <= journalled


@pytest.fixture
def store(engine: Engine) -> Store:
    created = Store(engine, batch_size=50)
    created.init_db()
    return created


def sweeper(store: Store, root: Path, database_url: str, **overrides: Any) -> Sweeper:
    return Sweeper(store, make_settings(root, database_url, **overrides), instance_id="test")


def sweep_cli(args: list[str], database_url: str, root: Path) -> tuple[int, dict[str, Any], str]:
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }
    env["FSWATCH_SYNC_DATABASE_URL"] = database_url
    result = subprocess.run(
        [sys.executable, "-m", "fswatch_sync", "sweep", "--json", "--root", str(root), *args],
        cwd=root.parent, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return result.returncode, report, result.stderr


MODEL_KEYS = [AppKey(SLUG, n) for n in range(1, 11)]
OTHER_KEYS = [AppKey(OTHER, n) for n in range(1, 27)]


def test_a_mount_over_one_model_directory_removes_nothing_of_it(
    store: Store, database_url: str, apps_root: Path
) -> None:
    # 10 of 36 rows under one model directory: below the fraction, which alone let them go.
    seed_tree(store.engine, apps_root, [*MODEL_KEYS, *OTHER_KEYS])
    shutil.rmtree(apps_root / OTHER / "app26")  # a real orphan elsewhere
    with tmpfs_over(apps_root / SLUG):
        report = sweeper(store, apps_root, database_url).run(now=db.utcnow())
        assert app_keys(store.engine) == {*MODEL_KEYS, *OTHER_KEYS[:25]}
        assert removed_properly(store.engine, [OTHER_KEYS[25]], "sweep")
        assert active_task_keys(store.engine) == {*MODEL_KEYS, *OTHER_KEYS[:25]}
        assert report.untrusted_models == [SLUG]
        assert report.untrusted_rows == 10
        assert report.to_dict()["untrusted_models"] == [SLUG]

        # The command line says so in its JSON; --force (the fraction) does not pass it.
        code, printed, stderr = sweep_cli(["--force"], database_url, apps_root)
        assert code == 0, stderr
        assert (printed["untrusted_models"], printed["orphan_apps"]) == ([SLUG], 0)
        assert app_keys(store.engine) == {*MODEL_KEYS, *OTHER_KEYS[:25]}

        # Forced for that model (and the fraction, 10 of 35): its rows go.
        code, printed, stderr = sweep_cli(
            ["--force-model", SLUG, "--force"], database_url, apps_root
        )
        assert code == 0, stderr
        assert (printed["untrusted_models"], printed["orphan_apps"]) == ([], 10)
        assert removed_properly(store.engine, MODEL_KEYS, "sweep")
        assert app_keys(store.engine) == set(OTHER_KEYS[:25])


def test_a_model_directory_that_is_a_volume_of_its_own_is_left_alone(
    store: Store, database_url: str, apps_root: Path
) -> None:
    with tmpfs_over(apps_root / SLUG):
        seed_tree(store.engine, apps_root, [*MODEL_KEYS, *OTHER_KEYS])
        shutil.rmtree(apps_root / SLUG / "app1")  # shows apps, but on another device
        report = sweeper(store, apps_root, database_url).run(now=db.utcnow())
        assert app_keys(store.engine) == {*MODEL_KEYS, *OTHER_KEYS}
        assert (report.untrusted_models, report.orphan_apps) == ([SLUG], 0)
        report = sweeper(store, apps_root, database_url).run(
            now=db.utcnow(), force_models=[SLUG]
        )
        assert (report.untrusted_models, report.orphan_apps) == ([], 1)
        assert removed_properly(store.engine, [MODEL_KEYS[0]], "sweep")


def test_the_reactor_removes_nothing_of_a_model_directory_under_a_mount(
    database_url: str, apps_root: Path, engine: Engine
) -> None:
    init_database(database_url)
    # A polling observer infers removals from listings: the mount hides every app of the model.
    settings = make_settings(
        apps_root, database_url, observer="polling", polling_interval_seconds=0.1
    )
    seed_tree(engine, apps_root, [*MODEL_KEYS[:3], *OTHER_KEYS[:3]])
    with running_service(settings) as service:
        with tmpfs_over(apps_root / SLUG):
            # Once the polling observer has listed the mount, the hidden apps are held back (as
            # three app hints or one for the model directory, whose inode changed).
            wait_until(
                lambda: service.reactor.waiting()["apps"] == 3, what="the hidden apps held back"
            )
            assert app_keys(engine) == {*MODEL_KEYS[:3], *OTHER_KEYS[:3]}
            shutil.rmtree(apps_root / OTHER / "app1")  # the rest of the tree still works
            wait_until(lambda: not has_row(engine, OTHER_KEYS[0]), what="a real removal")
            assert app_keys(engine) == {*MODEL_KEYS[:3], *OTHER_KEYS[1:3]}
            assert active_task_keys(engine) == {*MODEL_KEYS[:3], *OTHER_KEYS[1:3]}
            assert service.status_stats()["waiting_rows"] == 3
            report = service.sweep_now()  # the service's own sweep judges the same
            assert (report.untrusted_models, report.orphan_apps) == ([SLUG], 0)
            assert app_keys(engine) == {*MODEL_KEYS[:3], *OTHER_KEYS[1:3]}
            assert service.status_stats()["waiting_rows"] == 3
        assert removed_properly(engine, [OTHER_KEYS[0]], "reactor")


def test_the_reactor_removes_nothing_in_a_model_directory_on_another_device(
    database_url: str, apps_root: Path, engine: Engine
) -> None:
    init_database(database_url)
    with tmpfs_over(apps_root / SLUG):
        seed_tree(engine, apps_root, [*MODEL_KEYS[:3], *OTHER_KEYS[:3]])
        with running_service(make_settings(apps_root, database_url)) as service:
            shutil.rmtree(apps_root / SLUG / "app1")
            shutil.rmtree(apps_root / OTHER / "app1")
            wait_until(lambda: not has_row(engine, OTHER_KEYS[0]), what="the trusted removal")
            wait_until(
                lambda: service.stats.get("events_handled") >= 2, what="both hints handled"
            )
            wait_until(lambda: service.reactor.pending() == 0, what="the queue drained")
            assert app_keys(engine) == {*MODEL_KEYS[:3], *OTHER_KEYS[1:3]}
            assert removed_properly(engine, [OTHER_KEYS[0]], "reactor")
            wait_until(
                lambda: service.reactor.waiting()["apps"] == 1, what="the other held back"
            )


class Hints:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Hint] = []

    def __call__(self, hint: Hint) -> None:
        with self.lock:
            self.seen.append(hint)

    def evidence(self) -> dict[Hint, bool]:
        with self.lock:
            return {hint: hint.reported for hint in self.seen}


@contextmanager
def watching(root: Path, kind: str) -> Iterator[Hints]:
    hints = Hints()
    watcher = Watcher(
        root, on_hint=hints, on_root_change=lambda: None, on_overflow=lambda: None,
        observer_kind=kind, polling_interval=0.05,
    )
    watcher.start()
    try:
        yield hints
    finally:
        watcher.stop()


@pytest.mark.parametrize("kind", ["native", "polling"])
def test_only_the_kernel_reports_removals_on_the_roots_device(apps_root: Path, kind: str) -> None:
    for slug in (SLUG, OTHER):
        for number in (1, 2):
            (apps_root / slug / f"app{number}").mkdir(parents=True)
    with tmpfs_over(apps_root / "mounted"):
        (apps_root / "mounted" / "app1").mkdir()
        with watching(apps_root, kind) as hints:
            shutil.rmtree(apps_root / SLUG / "app1")
            shutil.rmtree(apps_root / "mounted" / "app1")
            shutil.rmtree(apps_root / OTHER)
            expected: dict[Hint, bool] = {
                AppGone(AppKey(SLUG, 1)): kind == "native",
                AppGone(AppKey("mounted", 1)): False,  # another device: proves nothing here
                ModelGone(OTHER): kind == "native",
            }
            wait_until(
                lambda: set(expected) <= set(hints.evidence()), what="the three hints",
                on_timeout=lambda: str(hints.evidence()),
            )
            evidence = hints.evidence()
            assert {hint: evidence[hint] for hint in expected} == expected, hints.seen


# -- an empty or missing root ---------------------------------------------------------------------


def test_force_never_passes_a_missing_or_empty_root(
    store: Store, database_url: str, apps_root: Path
) -> None:
    seed_tree(store.engine, apps_root, MODEL_KEYS)
    before = app_keys(store.engine)
    with tmpfs_over(apps_root):  # the volume is not mounted: an empty mount point
        for args in (["--force"], ["--force", "--force-model", SLUG]):
            code, printed, stderr = sweep_cli(args, database_url, apps_root)
            assert (code, printed["refused"]) == (3, True), stderr
            assert app_keys(store.engine) == before
        code, printed, stderr = sweep_cli(
            ["--allow-empty-root", "--dry-run"], database_url, apps_root
        )
        assert (code, printed["orphan_apps"]) == (0, 10), stderr  # what the flag would do
        assert app_keys(store.engine) == before
    missing = apps_root.with_name("unmounted")
    for args in (["--force"], ["--force", "--allow-empty-root"]):
        code, printed, stderr = sweep_cli(args, database_url, missing)
        assert (code, printed["refused"]) == (3, True), stderr
        assert "the root is missing" in stderr
    assert active_task_keys(store.engine) == before


# -- the last app ----------------------------------------------------------------------------------


def test_the_sweep_removes_the_last_app_of_the_same_root(
    store: Store, database_url: str, apps_root: Path
) -> None:
    key = AppKey(SLUG, 1)
    seed_tree(store.engine, apps_root, [key])
    # A fresh one-shot sweep with nothing recorded refuses an empty root...
    shutil.rmtree(apps_root / SLUG / "app1")
    with pytest.raises(SweepRefused, match="no app directory"):
        sweeper(store, apps_root, database_url).run(now=db.utcnow())
    assert has_row(store.engine, key)
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(tree_table)).scalar() == 0

    # ... but once a sweep has seen this root holding apps, the last one's deletion is real.
    (apps_root / SLUG / "app1").mkdir()
    report = sweeper(store, apps_root, database_url).run(now=db.utcnow())
    assert report.orphan_apps == 0
    shutil.rmtree(apps_root / SLUG / "app1")
    report = sweeper(store, apps_root, database_url).run(now=db.utcnow())
    assert (report.orphan_apps, report.orphan_tasks) == (1, 2)
    assert removed_properly(store.engine, [key], "sweep")


def test_the_sweep_refuses_an_empty_root_that_is_another_directory(
    store: Store, database_url: str, apps_root: Path
) -> None:
    keys = [AppKey(SLUG, 1), AppKey(SLUG, 2)]
    seed_tree(store.engine, apps_root, keys)
    sweeper(store, apps_root, database_url).run(now=db.utcnow())  # records the root
    # Unmounted: the mount point is another directory.
    with tmpfs_over(apps_root), pytest.raises(SweepRefused, match="no app directory"):
        sweeper(store, apps_root, database_url).run(now=db.utcnow())
    parked = apps_root.with_name("parked")
    os.rename(apps_root, parked)
    apps_root.mkdir()  # replaced by an empty directory
    with pytest.raises(SweepRefused, match="no app directory"):
        sweeper(store, apps_root, database_url).run(now=db.utcnow())
    assert app_keys(store.engine) == set(keys)
    assert active_task_keys(store.engine) == set(keys)


def test_the_reactor_removes_the_last_app(
    database_url: str, apps_root: Path, engine: Engine
) -> None:
    init_database(database_url)
    key = AppKey(SLUG, 1)
    app = seed_app(engine, apps_root, key)
    with running_service(make_settings(apps_root, database_url)) as service:
        wait_until(lambda: service.stats.get("watch_state") == "watching", what="watching")
        shutil.rmtree(app.path)
        wait_until(lambda: not has_row(engine, key), what="the last app's removal")
        assert app_state(engine, app) == "removed"
        assert service.stats.get("watch_state") == "watching"


def test_the_reactor_removes_the_last_app_of_a_model(
    database_url: str, apps_root: Path, engine: Engine
) -> None:
    init_database(database_url)
    last, other = AppKey(SLUG, 1), AppKey(OTHER, 1)
    app = seed_app(engine, apps_root, last)
    seed_app(engine, apps_root, other)
    with running_service(make_settings(apps_root, database_url)):
        shutil.rmtree(app.path)  # its model directory stays, empty: still the one watched
        wait_until(lambda: not has_row(engine, last), what="the removal")
        assert app_state(engine, app) == "removed"
        assert has_row(engine, other)


def test_an_unmounted_root_in_a_running_service_removes_nothing(
    database_url: str, apps_root: Path, engine: Engine
) -> None:
    init_database(database_url)
    keys = [AppKey(SLUG, 1), AppKey(OTHER, 1)]
    seed_tree(engine, apps_root, keys)
    settings = make_settings(apps_root, database_url)
    with running_service(settings) as service:
        wait_until(lambda: service.stats.get("watch_state") == "watching", what="watching")
        with tmpfs_over(apps_root):
            wait_until(
                lambda: service.stats.get("watch_state") == "root-empty", what="root-empty"
            )
            assert service.status_stats()["waiting_rows"] == 2
            with pytest.raises(SweepRefused):
                service.sweep_now()
            assert stays_false(lambda: app_keys(engine) != set(keys), 0.3)
        wait_until(lambda: service.stats.get("watch_state") == "watching", what="back")
    assert app_keys(engine) == set(keys)
    assert active_task_keys(engine) == set(keys)


# -- rm -rf of the root --------------------------------------------------------------------------

ROOT_KEYS = [AppKey(f"model_{m}", n) for m in range(4) for n in range(1, 51)]


def _status(database_url: str, root: Path, *args: str) -> str:
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }
    env["FSWATCH_SYNC_DATABASE_URL"] = database_url
    result = subprocess.run(
        [sys.executable, "-m", "fswatch_sync", "status", "--root", str(root), *args],
        cwd=root.parent.parent, env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _status_json(database_url: str, root: Path) -> dict[str, Any]:
    found = json.loads(_status(database_url, root, "--json"))
    assert isinstance(found, dict)
    return found


def test_rm_rf_of_the_root_removes_every_app_the_kernel_reported(
    database_url: str, tmp_path: Path, engine: Engine
) -> None:
    """The rule: an app directory the kernel reported removed is removed, even when the root
    goes right after; nothing is inferred from the root's absence. rm -rf removes every app
    directory (then every model directory) before the root: all 200, every time."""
    init_database(database_url)
    for trial in range(3):
        root = tmp_path / f"trial{trial}" / "apps"
        root.mkdir(parents=True)
        with engine.begin() as connection:
            connection.execute(sa.delete(TASKS))
            connection.execute(sa.delete(APPS))
        seed_tree(engine, root, ROOT_KEYS)
        left = _rm_rf_the_root(engine, make_settings(root, database_url, heartbeat_seconds=0.2))
        assert left == set(), f"trial {trial}: {len(left)} of {len(ROOT_KEYS)} rows left"
        assert active_task_keys(engine) == set()


def _rm_rf_the_root(engine: Engine, settings: Settings) -> set[AppKey]:
    """rm -rf of the root under a running service; the app rows left once it settled."""
    with running_service(settings) as service:
        wait_until(lambda: service.watcher.watch_count == 6, what="every watch")
        shutil.rmtree(settings.root)
        wait_until(
            lambda: not app_keys(engine),
            what="every removal",
            on_timeout=lambda: f"{len(app_keys(engine))} rows left",
        )
        assert removed_properly(engine, ROOT_KEYS, "reactor")
        assert active_task_keys(engine) == set()
        wait_until(
            lambda: service.stats.get("watch_state") == "root-missing", what="root-missing"
        )
        wait_until(lambda: service.status_stats()["waiting_rows"] == 0, what="none waiting")
        wait_until(lambda: service.reactor.pending() == 0, what="the queue drained")
        held = service.reactor.waiting()
        assert (held["apps"], held["models"]) == (0, 0), held  # every hint was a kernel report
    return app_keys(engine)


def test_rows_waiting_for_a_root_that_went_are_shown(
    database_url: str, apps_root: Path, engine: Engine
) -> None:
    init_database(database_url)
    keys = [AppKey(SLUG, n) for n in range(1, 4)]
    seed_tree(engine, apps_root, keys)
    settings = make_settings(apps_root, database_url, heartbeat_seconds=0.2)
    with running_service(settings) as service:
        os.rename(apps_root, apps_root.with_name("parked"))  # moved away: nothing reported
        wait_until(lambda: service.status_stats()["waiting_rows"] == 3, what="3 rows waiting")
        assert service.status()["stats"]["waiting_rows"] == 3
        assert service.stats.get("watch_state") == "root-missing"
        wait_until(
            lambda: _status_json(database_url, apps_root)["waiting_rows"] == 3,
            what="the waiting rows in `status --json`",
        )
        assert "3 app rows wait" in _status(database_url, apps_root)
        assert app_keys(engine) == set(keys)
    assert active_task_keys(engine) == set(keys)


def test_healthz_shows_the_waiting_rows(
    database_url: str, apps_root: Path, engine: Engine
) -> None:
    pytest.importorskip("prometheus_client")
    import http.client

    from fswatch_sync.http import serve

    init_database(database_url)
    seed_tree(engine, apps_root, [AppKey(SLUG, 1), AppKey(SLUG, 2)])
    settings = make_settings(apps_root, database_url, http="127.0.0.1:0")
    service = Service(settings, initial_sweep=False)
    service.start()
    server = serve(service, settings)

    def get(path: str) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request("GET", path)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    try:
        assert get("/healthz")["waiting_rows"] == 0
        os.rename(apps_root, apps_root.with_name("parked"))
        wait_until(lambda: get("/healthz")["waiting_rows"] == 2, what="/healthz waiting rows")
        assert get("/healthz")["watch_state"] == "root-missing"
        assert get("/status")["stats"]["waiting_rows"] == 2
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            metrics = connection.getresponse().read().decode()
        finally:
            connection.close()
        assert "fswatch_sync_waiting_rows 2.0" in metrics.splitlines()
    finally:
        server.shutdown()
        service.stop()


def test_the_tree_record_keeps_what_changed_and_forgets_what_is_gone(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    init_database(database_url)
    now = db.utcnow()
    record = treehealth.TreeRecord(engine, tmp_path / "apps", hostname="here")
    other = treehealth.TreeRecord(engine, tmp_path / "apps", hostname="elsewhere")
    first: dict[str | None, treehealth.Identity] = {None: (1, 10), "a": (1, 11), "b": (1, 12)}
    record.save(first, known={}, now=now)
    other.save({None: (2, 20), "a": (2, 21)}, known={}, now=now)
    assert record.load() == first

    # The root remounted (a new identity), "a" unchanged, "b" gone, "c" new.
    record.save(
        {None: (3, 30), "a": (1, 11), "c": (1, 13)}, forget=["b"], known=first, now=now
    )
    assert record.load() == {None: (3, 30), "a": (1, 11), "c": (1, 13)}
    assert other.load() == {None: (2, 20), "a": (2, 21)}, "another scope is left alone"
    with engine.connect() as connection:
        rows = connection.execute(sa.select(sa.func.count()).select_from(tree_table)).scalar_one()
    assert rows == 5, "one row per scope and name: nothing saved twice"


def test_the_tree_record_forgets_thousands_of_models_with_any_name(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    """More model directories than one statement takes, with names a shell or SQL would
    treat specially: each is forgotten exactly, and only it."""
    init_database(database_url)
    now = db.utcnow()
    record = treehealth.TreeRecord(engine, tmp_path / "apps", hostname="here")
    odd = ["~model", "it's", "50%_off", "back\\slash", "new\nline", "model?", "a b"]
    slugs = odd + [f"model-{n}" for n in range(2_500)]
    seen: dict[str | None, treehealth.Identity] = {None: (1, 1)}
    seen.update({slug: (1, 10 + n) for n, slug in enumerate(slugs)})
    record.save(seen, known={}, now=now)
    assert record.load() == seen

    kept = {None: (1, 1), "model-7": seen["model-7"]}
    record.save(kept, forget=[s for s in slugs if s != "model-7"], known=seen, now=now)
    assert record.load() == kept
