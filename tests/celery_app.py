"""The Celery app the Celery tests run in real worker and beat processes (``-A celery_app``).

It is a host's app as the README shows it (``register(app)``, settings from the environment),
plus what the tests observe through, all set by environment variables:

- ``FSWATCH_TEST_BROKER``, ``FSWATCH_TEST_PREFIX``: the Redis broker, and a key prefix and
  queue name of the test's own (several test runs share one Redis);
- ``FSWATCH_TEST_INTERVAL``: the beat interval, seconds;
- ``FSWATCH_TEST_LOG``: a file each process appends JSON lines to: ``sent`` (beat published a
  tick), ``ready`` (a worker consumes), ``start`` and ``done`` (a task ran, and returned what) and
  ``expired``;
- ``FSWATCH_TEST_HOLD_SECONDS``: every sweep holds its lease that long before its passes;
- ``FSWATCH_TEST_PAUSE``: a path; the first process to reach the commit of its second app-removal
  transaction creates it (holding its pid) and waits there to be killed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import (
    after_task_publish,
    task_postrun,
    task_prerun,
    task_revoked,
    worker_ready,
)
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from fswatch_sync import signals
from fswatch_sync.celery_tasks import register


def make_app(broker: str, prefix: str) -> Celery:
    app = Celery("fswatch_test", broker=broker)
    app.conf.update(
        broker_transport_options={"global_keyprefix": f"{prefix}:"},
        task_default_queue=prefix,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
    )
    return app


app = make_app(
    os.environ.get("FSWATCH_TEST_BROKER", "redis://127.0.0.1:6379/0"),
    os.environ.get("FSWATCH_TEST_PREFIX", "fswatch-test"),
)
register(app, interval_seconds=float(os.environ.get("FSWATCH_TEST_INTERVAL", "1")))

_LOG = os.environ.get("FSWATCH_TEST_LOG")
_write_lock = threading.Lock()


def note(kind: str, **fields: Any) -> None:
    if not _LOG:
        return
    line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    with _write_lock, open(_LOG, "a", encoding="utf-8") as log:
        log.write(line)


def _sent(headers: dict[str, Any] | None = None, **_extra: Any) -> None:
    note("sent", id=(headers or {}).get("id"))


def _ready(**_extra: Any) -> None:
    note("ready")


def _start(task_id: str | None = None, **_extra: Any) -> None:
    note("start", id=task_id)


def _done(task_id: str | None = None, retval: Any = None, **_extra: Any) -> None:
    status = retval.get("status") if isinstance(retval, dict) else repr(retval)
    note("done", id=task_id, status=status)


def _revoked(request: Any = None, expired: bool = False, **_extra: Any) -> None:
    note("expired" if expired else "revoked", id=getattr(request, "id", None))


after_task_publish.connect(_sent)
worker_ready.connect(_ready)
task_prerun.connect(_start)
task_postrun.connect(_done)
task_revoked.connect(_revoked)

_hold = float(os.environ.get("FSWATCH_TEST_HOLD_SECONDS", "0"))
if _hold > 0:

    @signals.sweep_started.connect
    def _hold_lease(_sender: Any, **_extra: Any) -> None:
        threading.Event().wait(_hold)


_pause = os.environ.get("FSWATCH_TEST_PAUSE", "")
if _pause:
    _removal_commits = 0

    @event.listens_for(Engine, "before_cursor_execute")
    def _see_removal(
        connection: Connection, _cursor: Any, statement: str, *_args: Any
    ) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM GENERATED_APPLICATIONS"):
            connection.info["removes_apps"] = True

    @event.listens_for(Engine, "rollback")
    def _forget_removal(connection: Connection) -> None:
        connection.info.pop("removes_apps", None)

    @event.listens_for(Engine, "commit")
    def _pause_before_commit(connection: Connection) -> None:
        global _removal_commits
        if not connection.info.pop("removes_apps", False):
            return
        _removal_commits += 1
        if _removal_commits != 2:
            return
        try:
            fd = os.open(_pause, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another process paused already: this one runs on
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        note("paused")
        threading.Event().wait(120)  # until the test kills this process
