"""A separate process for the leadership tests (run as a script, never collected by pytest).

    python tests/_lease_worker.py sweep URL ROOT INDEX SECONDS LEASE_SECONDS [--no-lease]
    python tests/_lease_worker.py hold URL HOLDER LEASE_SECONDS

``sweep``: prints ``ready``, waits for a line on stdin, then for SECONDS (longer, up to
EXTRA_SECONDS more, until two instances have swept) keeps adding an orphan app row (old, no
directory) with a pending task and running ``Sweeper.run``, as a busy instance would; prints
one JSON line ``{"ok": n, "busy": m}`` and exits 0. ``--no-lease`` turns the lease into no-ops:
the tests use it to show that their overlap check does catch concurrent sweeps.

``hold``: takes the lease, prints ``held <ISO time it took it>``, then blocks on stdin until
it is killed.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fswatch_sync import db
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.errors import LeaseUnavailable
from fswatch_sync.records import Lease
from fswatch_sync.schema import sweeps_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

HOST = default_host_metadata(SchemaConfig())
EXTRA_SECONDS = 15.0
APPS = HOST.tables["generated_applications"]
TASKS = HOST.tables["analysis_tasks"]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _disable_lease() -> None:
    def nothing(*_args: Any, **_kwargs: Any) -> None:
        return None

    for name in ("acquire_or_raise", "check_and_extend", "renew", "release"):
        setattr(Lease, name, nothing)


def _add_orphan(engine: sa.Engine, slug: str, number: int) -> None:
    old = db.to_db_time(db.utcnow() - timedelta(days=1))

    def insert() -> None:
        with engine.begin() as connection:
            connection.execute(
                sa.insert(APPS).values(model_slug=slug, app_number=number, created_at=old)
            )
            connection.execute(
                sa.insert(TASKS).values(
                    task_id=f"{slug}-{number}", target_model=slug, target_app_number=number,
                    status="pending", created_at=db.to_db_time(db.utcnow()),
                )
            )

    db.retrying(10.0)(insert)()


def _done(engine: sa.Engine, elapsed: float, seconds: float) -> bool:
    """After SECONDS, once two instances have swept; on a machine too busy for that, after
    EXTRA_SECONDS more (the test then reports who swept)."""
    if elapsed < seconds:
        return False
    if elapsed >= seconds + EXTRA_SECONDS:
        return True
    with engine.connect() as connection:
        sweepers = connection.execute(
            sa.select(sa.func.count(sa.distinct(sweeps_table.c.instance_id)))
        ).scalar_one()
    return int(sweepers) >= 2


def sweep(url: str, root: str, index: int, seconds: float, lease_seconds: float,
          no_lease: bool) -> int:
    if no_lease:
        _disable_lease()
    engine = db.create_engine(url)
    settings = Settings(
        root=Path(root), database_url=url, lease_seconds=lease_seconds, max_delete_fraction=1.0
    )
    sweeper = Sweeper(Store(engine), settings, instance_id=f"worker-{index}")
    pause = threading.Event()  # never set: wait() is this loop's back-off between turns
    _say("ready")
    sys.stdin.readline()
    ok = busy = 0
    started = time.monotonic()
    number = 0
    while not _done(engine, time.monotonic() - started, seconds):
        number += 1
        _add_orphan(engine, f"w{index}", number)
        try:
            sweeper.run(trigger="manual")
        except LeaseUnavailable:
            busy += 1
            pause.wait(random.uniform(0.0, 0.01))
        else:
            ok += 1
            pause.wait(random.uniform(0.0, 0.02))
    engine.dispose()
    _say(json.dumps({"ok": ok, "busy": busy}))
    return 0


def hold(url: str, holder: str, lease_seconds: float) -> int:
    engine = db.create_engine(url)
    lease = Lease(engine, holder, duration_seconds=lease_seconds)
    moment = db.utcnow()
    if not lease.try_acquire(moment):
        _say("busy")
        return 1
    _say(f"held {moment.isoformat()}")
    sys.stdin.read()  # until killed (or stdin closes)
    return 0


def main(argv: list[str]) -> int:
    mode, url = argv[0], argv[1]
    if mode == "sweep":
        return sweep(url, argv[2], int(argv[3]), float(argv[4]), float(argv[5]),
                     "--no-lease" in argv[6:])
    if mode == "hold":
        return hold(url, argv[2], float(argv[3]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
