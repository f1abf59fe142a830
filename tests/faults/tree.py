"""Fault scenarios for "can the tree be trusted?" (issue 11, points 3 to 6).

* ``tree-model-mount``: a tmpfs mounted over one random model directory (its apps hidden) of a
  tree where some other apps are really gone; a one-shot sweep, ``sweep --force`` and a running
  service's sweep and reactor (polling observer: it infers removals from listings) run with the
  mount in place. Exactly the really-gone apps go; not one row of the hidden model.
* ``tree-root-rm-rf``: ``rm -rf`` of a watched root of 200 apps under a running service. The rule
  (README): every app directory the kernel reported removed is removed, whatever happens to the
  root afterwards — all 200, every round, each with its tasks cancelled; none left waiting.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from helpers import make_settings, wait_until

from faults.harness import Run, Unavailable, scenario
from faults.kit import (
    TaskSeed,
    app_keys,
    clear_rows,
    insert_apps,
    insert_tasks,
    make_dirs,
    prepare_database,
    probe_engine,
    remove_tree,
    task_rows,
)
from faults.servers import scratch_database
from fswatch_sync import db
from fswatch_sync.errors import SweepRefused
from fswatch_sync.layout import AppKey
from fswatch_sync.service import Service
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper


@contextmanager
def tmpfs_over(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "fswatch-sync-fault", str(path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise Unavailable(f"cannot mount a tmpfs: {result.stderr.strip() or result.returncode}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _seed(url: str, keys: list[AppKey]) -> None:
    with probe_engine(url) as engine:
        clear_rows(engine)
        # Apps past the new-app grace; tasks younger than the stuck timeouts.
        now = db.utcnow()
        insert_apps(engine, [(key, now - timedelta(hours=1)) for key in keys])
        recent = now - timedelta(minutes=5)
        insert_tasks(engine, [
            TaskSeed(f"{key.model_slug}-{key.app_number}-{status}", key, status,
                     created_at=recent, started_at=recent if status == "running" else None)
            for key in keys for status in ("pending", "running")
        ])


def _active(url: str) -> set[AppKey]:
    with probe_engine(url) as engine:
        return {
            AppKey(task["target_model"], int(task["target_app_number"]))
            for task in task_rows(engine).values()
            if task["status"] in ("pending", "running")
        }


def _rows(url: str) -> set[AppKey]:
    with probe_engine(url) as engine:
        return app_keys(engine)


def model_mount_round(url: str, workdir: Path, rng: random.Random) -> int:
    """One round; returns how many rows of the hidden model were kept (all of them)."""
    root = workdir / "apps"
    models = [f"model_{m}" for m in range(rng.randint(3, 6))]
    keys = [AppKey(slug, n) for slug in models for n in range(1, rng.randint(3, 12))]
    hidden = rng.choice(models)
    hidden_keys = {key for key in keys if key.model_slug == hidden}
    gone = {key for key in keys if key.model_slug != hidden and rng.random() < 0.1}
    make_dirs(root, [key for key in keys if key not in gone])
    _seed(url, keys)
    expected = set(keys) - gone
    # The polling observer infers removals from listings: the mount looks like deletions.
    service = Service(
        make_settings(root, url, observer="polling", polling_interval_seconds=0.05),
        initial_sweep=False,
    )
    service.start()
    try:
        with tmpfs_over(root / hidden):
            wait_until(lambda: service.reactor.waiting()["apps"] == len(hidden_keys),
                       what="the hidden apps held back",
                       on_timeout=lambda: str(service.reactor.waiting()))
            if _rows(url) != set(keys):
                raise AssertionError(f"the reactor took {set(keys) - _rows(url)}")
            for force in (False, True):
                store = Store(db.create_engine(url))
                try:
                    Sweeper(store, make_settings(root, url, max_delete_fraction=1.0),
                            instance_id="fault").run(force=force, now=db.utcnow())
                except SweepRefused as exc:
                    raise AssertionError(f"refused: {exc}") from None
                finally:
                    store.engine.dispose()
                if _rows(url) != expected or _active(url) != expected:
                    raise AssertionError(
                        f"sweep (force={force}): rows {_rows(url) ^ expected},"
                        f" active {_active(url) ^ expected}"
                    )
            service.sweep_now()
            victim = rng.choice(sorted(expected - hidden_keys))
            shutil.rmtree(root / victim.model_slug / f"app{victim.app_number}")
            wait_until(lambda: victim not in _rows(url), what=f"the removal of {victim}")
            expected.discard(victim)
            wait_until(lambda: service.reactor.pending() == 0, what="the queue drained")
            if _rows(url) != expected or _active(url) != expected:
                raise AssertionError(f"the service took {expected - _rows(url)}")
    finally:
        service.stop()
    return len(hidden_keys)


@scenario(
    "tree-model-mount",
    backends=("sqlite", "postgres", "mysql"),
    quick=2,
    long=20,
    summary="a tmpfs mounted over one random model directory (its apps hidden) while other apps"
    " are really gone: a sweep, `sweep --force` and a running service (polling observer: the"
    " mount looks like deletions) remove exactly the really-gone apps and not one row of the"
    " hidden model",
    timeout_s=600,
)
def tree_model_mount(run: Run) -> str:
    assert run.backend is not None
    rng = run.rng()
    kept = 0
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            kept += model_mount_round(url, run.workdir / f"round{index}", rng)
            remove_tree(run.workdir / f"round{index}")
    return f"{run.rounds} mounts: {kept} hidden rows kept, 0 wrong removals"


def root_rm_rf_round(url: str, workdir: Path, apps: int = 200) -> None:
    root = workdir / "apps"
    keys = [AppKey(f"model_{n % 4}", n) for n in range(1, apps + 1)]
    make_dirs(root, keys)
    _seed(url, keys)
    service = Service(make_settings(root, url), initial_sweep=False)
    service.start()
    try:
        wait_until(lambda: service.watcher.watch_count == 6, what="every watch")
        shutil.rmtree(root)
        wait_until(lambda: not _rows(url), what="every removal",
                   on_timeout=lambda: f"{len(_rows(url))} of {apps} rows left")
        if _active(url):
            raise AssertionError(f"tasks left active: {sorted(_active(url))[:5]}")
        wait_until(lambda: service.status_stats()["waiting_rows"] == 0, what="none waiting")
    finally:
        service.stop()


@scenario(
    "tree-root-rm-rf",
    backends=("sqlite", "postgres", "mysql"),
    quick=3,
    long=20,
    summary="rm -rf of a watched root of 200 apps under a running service: every app directory"
    " the kernel reported removed is removed, whatever happens to the root afterwards - all 200"
    " rows, every round, with their tasks cancelled; none left waiting",
    timeout_s=900,
)
def tree_root_rm_rf(run: Run) -> str:
    assert run.backend is not None
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            root_rm_rf_round(url, run.workdir / f"round{index}")
    return f"{run.rounds} x rm -rf of 200 apps: 200 removed each time"
