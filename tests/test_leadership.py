"""One sweeper among many processes, on SQLite, PostgreSQL and MariaDB.

Real processes (``tests/_lease_worker.py``) share one database. The proof that two sweeps never
ran at once is read from the sweep history every sweep writes (``fswatch_sync_sweeps``): no two
[started_at, finished_at] intervals overlap. The same check run on workers whose lease is
switched off does find overlaps, so it is a check that can fail.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from helpers import wait_until
from sqlalchemy.engine import Engine

from fswatch_sync import db, signals
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.layout import AppKey
from fswatch_sync.records import Lease, LeaseLost
from fswatch_sync.schema import journal_table, leases_table, sweeps_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

WORKER = Path(__file__).with_name("_lease_worker.py")
HOST = default_host_metadata(SchemaConfig())
APPS = HOST.tables["generated_applications"]
TASKS = HOST.tables["analysis_tasks"]

RUN_SECONDS = 1.0
LEASE_SECONDS = 2.0
PRESENT_APPS = 5


# -- driving worker processes ------------------------------------------------------------------


class Worker:
    """A worker process whose stdout is read line by line against a deadline."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            bufsize=0,
        )
        self._buffer = b""

    def _pipe(self, name: str) -> IO[bytes]:
        pipe = getattr(self.process, name)
        assert pipe is not None
        return pipe  # type: ignore[no-any-return]

    def read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        stdout = self._pipe("stdout")
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line from {self.process.args!r} within {timeout}s")
            ready, _, _ = select.select([stdout], [], [], remaining)
            if ready:
                chunk = os.read(stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(
                        f"worker exited ({self.process.wait()}) before a line; see {self.log.name}"
                    )
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()

    def send(self, line: str) -> None:
        stdin = self._pipe("stdin")
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for name in ("stdin", "stdout"):
            pipe = getattr(self.process, name)
            if pipe is not None:
                pipe.close()
        self.log.close()


@dataclass(frozen=True)
class SweepRow:
    instance_id: str
    outcome: str
    started_at: datetime
    finished_at: datetime
    orphan_apps: int
    orphan_tasks: int


def sweep_rows(engine: Engine) -> list[SweepRow]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(sweeps_table).order_by(sweeps_table.c.id)).all()
    result = []
    for row in rows:
        started, finished = db.from_db_time(row.started_at), db.from_db_time(row.finished_at)
        assert started is not None
        assert finished is not None, f"sweep {row.id} of {row.instance_id} never finished"
        result.append(SweepRow(row.instance_id, row.outcome, started, finished,
                               row.orphan_apps, row.orphan_tasks))
    return result


def overlapping(rows: list[SweepRow]) -> list[tuple[SweepRow, SweepRow]]:
    """Pairs of sweeps whose [started_at, finished_at] intervals intersect."""
    found = []
    latest: SweepRow | None = None  # the sweep, among those started so far, that finished last
    for row in sorted(rows, key=lambda r: (r.started_at, r.finished_at)):
        if latest is not None and row.started_at <= latest.finished_at:
            found.append((latest, row))
        if latest is None or row.finished_at > latest.finished_at:
            latest = row
    return found


def describe(pairs: list[tuple[SweepRow, SweepRow]]) -> str:
    def one(row: SweepRow) -> str:
        return f"{row.instance_id} [{row.started_at:%H:%M:%S.%f}, {row.finished_at:%H:%M:%S.%f}]"

    return "; ".join(f"{one(a)} overlaps {one(b)}" for a, b in pairs)


def test_overlap_check_itself() -> None:
    t = datetime(2026, 1, 1)
    ms = timedelta(milliseconds=1)

    def row(start: int, end: int) -> SweepRow:
        return SweepRow("x", "ok", t + start * ms, t + end * ms, 0, 0)

    assert overlapping([row(0, 10), row(11, 20), row(21, 30)]) == []
    assert overlapping([row(0, 10), row(10, 20)]) != []  # touching counts: one instant shared
    assert overlapping([row(0, 100), row(20, 30), row(40, 50)]) == [
        (row(0, 100), row(20, 30)), (row(0, 100), row(40, 50))
    ]


def prepare(engine: Engine, root: Path) -> None:
    Store(engine).init_db()
    for number in range(1, PRESENT_APPS + 1):
        (root / "present" / f"app{number}").mkdir(parents=True)
    with engine.begin() as connection:
        connection.execute(
            sa.insert(APPS),
            [{"model_slug": "present", "app_number": n, "created_at": None}
             for n in range(1, PRESENT_APPS + 1)],
        )


def run_workers(
    count: int, database_url: str, root: Path, logs: Path, *, no_lease: bool = False
) -> list[dict[str, int]]:
    extra = ["--no-lease"] if no_lease else []
    workers = [
        Worker(
            ["sweep", database_url, str(root), str(index), str(RUN_SECONDS),
             str(LEASE_SECONDS), *extra],
            logs / f"worker-{index}.log",
        )
        for index in range(count)
    ]
    try:
        for worker in workers:
            assert worker.read_line(timeout=30) == "ready"
        for worker in workers:
            worker.send("go")
        results = [json.loads(worker.read_line(timeout=RUN_SECONDS + 90)) for worker in workers]
        for worker in workers:
            assert worker.process.wait(timeout=10) == 0
    finally:
        for worker in workers:
            worker.close()
    return results


@pytest.mark.parametrize("processes", [2, 4])
def test_never_two_sweeps_at_once(
    processes: int, database_url: str, engine: Engine, apps_root: Path, tmp_path: Path
) -> None:
    prepare(engine, apps_root)
    results = run_workers(processes, database_url, apps_root, tmp_path)

    rows = sweep_rows(engine)
    assert sum(r["ok"] for r in results) == len(rows)
    assert [r for r in rows if r.outcome != "ok"] == []
    clashes = overlapping(rows)
    assert not clashes, describe(clashes)
    sweepers = {row.instance_id for row in rows}
    assert len(sweepers) >= 2, f"only {sweepers} swept: {results}"
    assert sum(r["busy"] for r in results) > 0, "the workers never met the lease"

    # The work was done once: every orphan removed by exactly one sweep, its task cancelled
    # once, and the history's counts add up to what the journal recorded.
    with engine.connect() as connection:
        removed = connection.execute(
            sa.select(journal_table.c.model_slug, journal_table.c.app_number)
            .where(journal_table.c.action == "app_removed")
        ).all()
        cancelled = connection.execute(
            sa.select(sa.func.count()).select_from(journal_table)
            .where(journal_table.c.action == "task_cancelled")
        ).scalar_one()
        remaining = {
            AppKey(slug, number)
            for slug, number in connection.execute(sa.select(APPS.c.model_slug,
                                                             APPS.c.app_number))
        }
    assert len(removed) == len(set(removed)) == sum(row.orphan_apps for row in rows) > 0
    assert cancelled == sum(row.orphan_tasks for row in rows) == len(removed)
    assert {AppKey("present", n) for n in range(1, PRESENT_APPS + 1)} <= remaining


@pytest.mark.parametrize("backend", ["sqlite"])
def test_overlap_check_catches_sweepers_without_a_lease(
    engine: Engine, tmp_path: Path, apps_root: Path
) -> None:
    url = engine.url.render_as_string(hide_password=False)
    prepare(engine, apps_root)
    run_workers(2, url, apps_root, tmp_path, no_lease=True)
    rows = sweep_rows(engine)
    assert len({row.instance_id for row in rows}) == 2
    assert overlapping(rows) != []


# -- takeover after kill -9 --------------------------------------------------------------------


def test_takeover_after_kill_9(database_url: str, engine: Engine, tmp_path: Path) -> None:
    Store(engine).init_db()
    holder = Worker(["hold", database_url, "holder-a", str(LEASE_SECONDS)], tmp_path / "a.log")
    try:
        word, _, stamp = holder.read_line(timeout=30).partition(" ")
        assert word == "held"
        # The moment A took the lease, by A's clock (the one it stamped the lease with).
        expires = datetime.fromisoformat(stamp) + timedelta(seconds=LEASE_SECONDS)
        standby = Lease(engine, "holder-b", duration_seconds=LEASE_SECONDS)
        with engine.connect() as connection:
            assert connection.execute(sa.select(leases_table.c.holder)).scalars().all() == [
                "holder-a"
            ]

        holder.process.send_signal(signal.SIGKILL)
        assert holder.process.wait(timeout=10) == -signal.SIGKILL
        killed = db.utcnow()
        assert killed < expires, "the test was too slow to kill the holder inside its lease"

        # Poll for the lease; every attempt is timed on the same clock as A's acquisition.
        attempts: list[tuple[datetime, bool, datetime]] = []

        def attempt() -> bool:
            before = db.utcnow()
            taken = standby.try_acquire()
            attempts.append((before, taken, db.utcnow()))
            return taken

        wait_until(attempt, LEASE_SECONDS + 5, "the standby to take the lease", interval=0.02)
    finally:
        holder.close()

    assert attempts and not attempts[0][1], "a dead holder's unexpired lease was taken at once"
    assert attempts[-1][1], f"no takeover within {LEASE_SECONDS + 5}s of the kill"
    before, _, after = attempts[-1]
    # Not before the lease ran out, and soon after it did (polling every 20 ms).
    assert after >= expires, f"taken {(expires - after).total_seconds():.3f}s before expiry"
    assert before - expires < timedelta(seconds=1.0)
    assert standby.current_holder() == "holder-b"


# -- a holder that lost its lease cannot commit ------------------------------------------------


def host_state(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as connection:
        return {
            table.name: [tuple(row) for row in connection.execute(
                sa.select(table).order_by(*table.primary_key.columns))]
            for table in (APPS, TASKS, journal_table)
        }


def test_a_holder_taken_over_cannot_commit(
    database_url: str, engine: Engine, apps_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(engine)
    prepare(engine, apps_root)
    orphan = AppKey("gone", 1)
    old = db.to_db_time(db.utcnow() - timedelta(days=1))
    with engine.begin() as connection:
        connection.execute(sa.insert(APPS).values(model_slug="gone", app_number=1,
                                                  created_at=old))
        connection.execute(sa.insert(TASKS).values(
            task_id="t1", target_model="gone", target_app_number=1, status="pending",
            created_at=db.to_db_time(db.utcnow()),
        ))
    settings = Settings(root=apps_root, database_url=database_url, lease_seconds=LEASE_SECONDS)
    a = Sweeper(store, settings, instance_id="holder-a")
    b = Lease(engine, "holder-b", duration_seconds=LEASE_SECONDS)

    def take_over() -> None:
        assert b.try_acquire(now=db.utcnow() + timedelta(seconds=LEASE_SECONDS + 1))

    before = host_state(engine)

    # 1. A batch committed through the lease check, after the lease was taken over.
    a.lease.acquire_or_raise()
    assert not b.try_acquire(), "an unexpired lease must not be taken"
    take_over()
    guarded = store.with_commit_check(a.lease.check_and_extend)
    with pytest.raises(LeaseLost):
        guarded.remove_apps([orphan], source="sweep", now=db.utcnow())
    with pytest.raises(LeaseLost):
        a.lease.renew()
    assert host_state(engine) == before
    b.release()

    # 2. A whole sweep whose lease is taken over right after it renewed: the batch's own check
    #    before commit refuses, nothing changes, and A's release leaves B's lease alone.
    real_renew = a.lease.renew_if_due

    def renew_then_lose() -> None:
        real_renew()
        take_over()

    monkeypatch.setattr(a.lease, "renew_if_due", renew_then_lose)
    with pytest.raises(LeaseLost):
        a.run()
    assert host_state(engine) == before
    assert b.current_holder() == "holder-b"
    assert [row.outcome for row in sweep_rows(engine)] == ["failed"]
    b.release()

    # 3. Taken over between acquiring and the first renewal (while the sweep only read).
    monkeypatch.setattr(a.lease, "renew_if_due", real_renew)
    def on_started(_sender: object, **_extra: object) -> None:
        take_over()

    with signals.sweep_started.connected_to(on_started, sender=a), pytest.raises(LeaseLost):
        a.run()
    assert host_state(engine) == before
    b.release()

    # 4. The same sweep, lease kept: it does change the database (the checks above could fail).
    report = a.run()
    assert report.orphan_apps == 1
    assert report.orphan_tasks == 1
    after = host_state(engine)
    assert after != before
    assert ("gone", 1) not in [(row[1], row[2]) for row in after[APPS.name]]
