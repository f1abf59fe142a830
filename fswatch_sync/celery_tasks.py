"""Sweeps as a Celery task: scheduled by beat, run by whichever worker is free, one at a time.

Needs the ``celery`` extra (``pip install 'fswatch_sync[celery]'``). In the host's Celery app::

    from celery import Celery
    from fswatch_sync.celery_tasks import register

    app = Celery("webapp", broker="redis://127.0.0.1:6379/0")
    register(app)  # the task "fswatch_sync.sweep" and a beat entry every interval_seconds

Each run takes the database lease that every fswatch_sync instance shares; a worker that cannot
take it returns ``{"status": "skipped"}`` at once, so ticks that overlap a long sweep, or land on
several workers, never sweep twice. The reactor (watching the tree) is not a task: it needs one
long-lived owner, so run ``fswatch-sync run`` beside the workers as its own process, with
``FSWATCH_SYNC_ENABLED=false`` so that its periodic sweep is left to beat (see README, "Celery").

Each run sends two Celery events, ``task-sweep-started`` (trigger, dry_run) and
``task-sweep-finished`` (the report's ``--json`` keys), under the task's uuid, so Flower or any
event receiver sees what every sweep did. The per-row signals (``app_removed``,
``task_cancelled``...) stay in-process: one sweep may send thousands; their counts are in
``task-sweep-finished``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery import Celery, Task

from fswatch_sync import signals
from fswatch_sync.errors import LeaseUnavailable, SweepRefused
from fswatch_sync.settings import Settings, load_settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.sweep_report import SweepReport

log = logging.getLogger(__name__)

SWEEP_TASK = "fswatch_sync.sweep"
BEAT_ENTRY = "fswatch-sync-sweep"
TRIGGER = "celery"

SettingsSource = Settings | Callable[[], Settings] | None


class _Stores:
    """One store per worker process, made on first use: an engine (and its pool) made before a
    prefork worker forks must not be used by the children."""

    def __init__(self, source: SettingsSource) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._store: Store | None = None
        self._settings: Settings | None = None

    def get(self) -> tuple[Store, Settings]:
        with self._lock:
            if self._pid != os.getpid() or self._store is None or self._settings is None:
                if self._store is not None and self._pid != os.getpid():
                    # The parent's pooled connections are the parent's: dropped here without
                    # closing, which would end the parent's sessions from the child.
                    self._store.engine.dispose(close=False)
                    self._store = None
                settings = _resolve(self._source)
                store = Store.from_settings(settings)
                store.ensure_tool_tables()
                self._pid, self._store, self._settings = os.getpid(), store, settings
            return self._store, self._settings


def _resolve(source: SettingsSource, *, require_root: bool = True) -> Settings:
    if source is None:
        # The worker's environment and FSWATCH_SYNC_CONFIG, as for the command line.
        return load_settings(require_root=require_root)
    if isinstance(source, Settings):
        return source
    return source()


def register(
    app: Celery,
    settings: SettingsSource = None,
    *,
    schedule: bool = True,
    interval_seconds: float | None = None,
    name: str = SWEEP_TASK,
    **schedule_options: Any,
) -> Task:
    """Register the sweep task on ``app`` and, unless ``schedule`` is False, its beat entry.

    ``settings``: a Settings, a callable returning one (called once per worker process), or None
    to read the environment and ``FSWATCH_SYNC_CONFIG`` like the command line does.
    ``interval_seconds`` defaults to the settings' ``interval_seconds``. ``schedule_options``
    go to the beat entry's options (``queue=...``, for instance).
    """
    task = sweep_task(app, settings, name=name)
    if schedule:
        interval = (
            interval_seconds
            if interval_seconds is not None
            else _resolve(settings, require_root=False).interval_seconds
        )
        schedule_sweeps(app, interval, task_name=name, **schedule_options)
    return task


def sweep_task(app: Celery, settings: SettingsSource = None, *, name: str = SWEEP_TASK) -> Task:
    """Register (only) the task that runs one full sweep under the lease."""
    stores = _Stores(settings)

    # Not shared: the task belongs to this app, with these settings, not to every app made later.
    @app.task(name=name, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def sweep(task: Task, *, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
        store, resolved = stores.get()
        return run_sweep(task, store, resolved, force=force, dry_run=dry_run)

    return sweep


def schedule_sweeps(
    app: Celery,
    interval_seconds: float,
    *,
    task_name: str = SWEEP_TASK,
    entry: str = BEAT_ENTRY,
    **options: Any,
) -> None:
    """Add the beat entry that sends the sweep task every ``interval_seconds``.

    A tick that no worker picked up before the next one is due expires: a backlog (every worker
    busy or down for an hour) becomes one sweep when a worker is back, not a burst of them.
    """
    options.setdefault("expires", interval_seconds)
    app.add_periodic_task(
        timedelta(seconds=interval_seconds), app.signature(task_name), name=entry, **options
    )


def run_sweep(
    task: Task, store: Store, settings: Settings, *, force: bool = False, dry_run: bool = False
) -> dict[str, Any]:
    """One sweep as ``task``'s body: the result is JSON-able, ``status`` first."""
    request_id = getattr(task.request, "id", None) or uuid.uuid4().hex
    # The sweep history and the lease name the task, so `fswatch-sync status` leads to it.
    instance_id = f"celery-{request_id}"[:64]
    sweeper = Sweeper(store, settings, instance_id=instance_id)
    with _forwarding(task, sweeper):
        try:
            report = sweeper.run(force=force, dry_run=dry_run, trigger=TRIGGER)
        except LeaseUnavailable as exc:
            log.info("sweep skipped: %s", exc)
            return {"status": "skipped", "reason": str(exc)}
        except SweepRefused as exc:
            return {"status": "refused", "reason": str(exc)}
    return {"status": "swept", "instance_id": instance_id, **report.to_dict()}


@contextmanager
def _forwarding(task: Task, sweeper: Sweeper) -> Iterator[None]:
    """Send this sweeper's sweep signals on as Celery events of ``task``."""

    # Connected for every sender and filtered here: blinker drops a sender's connections when
    # that sender is collected, and a finished Sweeper (a reference cycle, collected whenever
    # the cyclic collector runs) may share its id() with the next one, whose connections would
    # then vanish mid-sweep.
    def started(sender: Any, *, trigger: str, dry_run: bool, **_extra: Any) -> None:
        if sender is sweeper:
            task.send_event("task-sweep-started", trigger=trigger, dry_run=dry_run)

    def finished(sender: Any, *, report: SweepReport, **_extra: Any) -> None:
        if sender is sweeper:
            task.send_event("task-sweep-finished", **report.to_dict())

    signals.sweep_started.connect(started, weak=False)
    signals.sweep_finished.connect(finished, weak=False)
    try:
        yield
    finally:
        signals.sweep_started.disconnect(started)
        signals.sweep_finished.disconnect(finished)
