"""Signals the host application can subscribe to.

Every signal is sent after the transaction that made the change has committed, from the thread
that made it (the reactor's, the sweeper's, or the caller's for a one-shot sweep). Receivers
should accept ``**extra`` so that new keyword arguments do not break them. A receiver that raises
is logged and skipped; it never stops the reactor or the sweep.

Example::

    from fswatch_sync import signals

    @signals.app_removed.connect
    def on_app_removed(sender, key, source, **extra):
        cache.delete(f"app:{key.model_slug}:{key.app_number}")
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal, Namespace

log = logging.getLogger(__name__)

_signals = Namespace()

app_removed: NamedSignal = _signals.signal(
    "app-removed",
    doc="""An app's row was deleted because its directory is gone.

    sender: the Service (or the Sweeper of a one-shot sweep).
    key: the AppKey (model_slug, app_number).
    source: "reactor" or "sweep".
    cancelled: list of TaskChange for the app's tasks cancelled in the same transaction.
    """,
)

task_cancelled: NamedSignal = _signals.signal(
    "task-cancelled",
    doc="""A task was set to the cancelled status.

    sender: as for app_removed.
    change: a TaskChange (pk, task_id, key, old_status, new_status).
    reason: "app_removed", "orphan" or "stuck_pending".
    source: "reactor" or "sweep".
    """,
)

task_failed: NamedSignal = _signals.signal(
    "task-failed",
    doc="""A running task exceeded the RUNNING timeout and was set to failed.

    sender: as for app_removed.
    change: a TaskChange.
    reason: "stuck_running".
    source: "sweep".
    """,
)

tasks_purged: NamedSignal = _signals.signal(
    "tasks-purged",
    doc="""Old terminal tasks were deleted by the sweep.

    sender: as for app_removed.
    count: how many tasks were deleted.
    cutoff: the datetime before which finished tasks were deleted.
    """,
)

sweep_started: NamedSignal = _signals.signal(
    "sweep-started",
    doc="""A sweep is about to run.

    sender: as for app_removed.
    trigger: "startup", "periodic", "manual", "signal", "overflow", "root-back", "recovery",
        "celery" (the Celery task, fswatch_sync.celery_tasks).
    dry_run: bool.
    """,
)

sweep_finished: NamedSignal = _signals.signal(
    "sweep-finished",
    doc="""A sweep finished (or was refused by its guard).

    sender: as for app_removed.
    report: the SweepReport (its to_dict() gives the --json object).
    """,
)

watch_degraded: NamedSignal = _signals.signal(
    "watch-degraded",
    doc="""The watcher cannot be trusted to see every removal right now.

    sender: the Service.
    reason: "root-missing", "root-empty", "overflow", "observer-error" or "recovered".
    detail: a human-readable sentence.
    """,
)


def send(signal: NamedSignal, sender: Any, **kwargs: Any) -> None:
    """Send to every receiver; one that raises is logged and the others still run."""
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            log.exception("receiver %r of signal %s failed", receiver, signal.name)
