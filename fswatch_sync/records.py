"""The tool's own bookkeeping rows: the maintenance lease, sweep history, live instances.

All of it lives in the database every instance already shares, so ``fswatch-sync status`` in any
process sees what every instance did, and two instances never sweep at the same time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from fswatch_sync import db
from fswatch_sync.errors import LeaseUnavailable
from fswatch_sync.schema import instances_table, leases_table, sweeps_table

log = logging.getLogger(__name__)

SWEEP_LEASE = "sweep"
# A released lease expires "long ago", so it is free whatever the clock of the next taker says.
_RELEASED = datetime(1970, 1, 2)


def storable(text: str) -> str:
    """``text`` with what no database can store escaped: a path that is not UTF-8 (the root, in
    a message) arrives with surrogate escapes, which every driver refuses to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def new_instance_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class LeaseLost(Exception):
    """The holder's lease expired or was taken over; the transaction must not commit."""


class Lease:
    """A named lease row with an expiry. Whoever holds an unexpired lease may do its work.

    Expiry is judged with the clock of the instance that asks; instances on several hosts need
    their clocks in step (NTP) to within a small part of the lease duration.
    """

    def __init__(self, engine: Engine, holder: str, *, name: str = SWEEP_LEASE,
                 duration_seconds: float = 30.0) -> None:
        self.engine = engine
        self.holder = holder
        self.name = name
        self.duration = timedelta(seconds=duration_seconds)
        # When this holder last proved and extended the lease (monotonic clock).
        self._extended_at = float("-inf")

    def try_acquire(self, now: datetime | None = None) -> bool:
        """Take or extend the lease; False while another holder's lease is unexpired."""
        return bool(db.retrying(10.0)(self._try_acquire)(now or db.utcnow()))

    def _try_acquire(self, now: datetime) -> bool:
        stamp, expires = db.to_db_time(now), db.to_db_time(now + self.duration)
        table = leases_table
        # A renewal keeps acquired_at; a take-over (or taking back an expired lease) sets it.
        # acquired_at is assigned first: MySQL evaluates SET clauses left to right.
        renewal = sa.and_(table.c.holder == self.holder, table.c.expires_at > stamp)
        with self.engine.begin() as connection:
            taken = connection.execute(
                sa.update(table)
                .where(
                    table.c.name == self.name,
                    sa.or_(table.c.holder == self.holder, table.c.expires_at <= stamp),
                )
                .ordered_values(
                    (table.c.acquired_at, sa.case((renewal, table.c.acquired_at), else_=stamp)),
                    (table.c.holder, self.holder),
                    (table.c.expires_at, expires),
                )
            ).rowcount
            if taken:
                self._extended_at = time.monotonic()
                return True
            exists = connection.execute(
                sa.select(table.c.name).where(table.c.name == self.name)
            ).first()
            if exists is not None:
                return False
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    sa.insert(table).values(
                        name=self.name, holder=self.holder, acquired_at=stamp, expires_at=expires
                    )
                )
        except IntegrityError:
            return False
        return True

    def acquire_or_raise(self, now: datetime | None = None) -> None:
        if not self.try_acquire(now):
            holder = self.current_holder()
            raise LeaseUnavailable(
                f"another instance is sweeping ({holder or 'unknown holder'}); try again later"
            )

    def check_and_extend(self, connection: Connection, now: datetime | None = None) -> None:
        """Inside a transaction about to commit: prove the lease is still ours, and extend it.

        Still ours means nobody took it over: every takeover writes its own holder, so a lease
        that ran out unnoticed but was not taken can safely be extended.
        """
        moment = now or db.utcnow()
        table = leases_table
        extended = connection.execute(
            sa.update(table)
            .where(
                table.c.name == self.name,
                table.c.holder == self.holder,
            )
            .values(expires_at=db.to_db_time(moment + self.duration))
        ).rowcount
        if not extended:
            raise LeaseLost(f"lease {self.name!r} is no longer held by {self.holder}")
        self._extended_at = time.monotonic()

    def renew(self, now: datetime | None = None) -> None:
        """Extend the lease in a transaction of its own; LeaseLost when it was taken over."""

        def attempt() -> None:
            with self.engine.begin() as connection:
                self.check_and_extend(connection, now)

        db.retrying(min(self.duration.total_seconds() / 2, 10.0))(attempt)()

    def renew_if_due(self) -> None:
        """Renew when a third of the lease has passed since it was last extended: between
        steps that may have committed nothing (every batch's commit extends it anyway)."""
        if time.monotonic() - self._extended_at > self.duration.total_seconds() / 3:
            self.renew()

    def release(self) -> None:
        """Give the lease up now (if still ours), for any other instance whatever its clock."""
        table = leases_table
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(table)
                .where(table.c.name == self.name, table.c.holder == self.holder)
                .values(expires_at=_RELEASED)
            )

    def current_holder(self, now: datetime | None = None) -> str | None:
        table = leases_table
        with db.read_only(self.engine).connect() as connection:
            row = connection.execute(
                sa.select(table.c.holder, table.c.expires_at).where(table.c.name == self.name)
            ).first()
        if row is None:
            return None
        expires = db.from_db_time(row.expires_at)
        if expires is None or expires <= (now or db.utcnow()):
            return None
        return str(row.holder)


class SweepLog:
    """One row per sweep in ``fswatch_sync_sweeps``."""

    def __init__(self, engine: Engine, instance_id: str) -> None:
        self.engine = engine
        self.instance_id = instance_id

    def started(self, *, trigger: str, dry_run: bool, forced: bool, now: datetime) -> int:
        with self.engine.begin() as connection:
            result = connection.execute(
                sa.insert(sweeps_table).values(
                    instance_id=self.instance_id,
                    trigger=trigger,
                    started_at=db.to_db_time(now),
                    dry_run=dry_run,
                    forced=forced,
                    outcome="running",
                    orphan_apps=0,
                    orphan_tasks=0,
                    stuck_tasks=0,
                    old_tasks=0,
                    blocked_apps=0,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def finished(self, sweep_id: int, *, outcome: str, counts: Mapping[str, int],
                 message: str | None, now: datetime) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(sweeps_table)
                .where(sweeps_table.c.id == sweep_id)
                .values(finished_at=db.to_db_time(now), outcome=outcome,
                        message=None if message is None else storable(message),
                        **dict(counts))
            )


    def interrupted(self, sweep_id: int, *, now: datetime) -> None:
        """Mark a sweep still recorded as running as interrupted (its thread did not stop)."""
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(sweeps_table)
                .where(sweeps_table.c.id == sweep_id, sweeps_table.c.outcome == "running")
                .values(finished_at=db.to_db_time(now), outcome="interrupted",
                        message="interrupted: the instance stopped during the sweep")
            )


def recent_sweeps(engine: Engine, limit: int = 10) -> list[dict[str, Any]]:
    with db.read_only(engine).connect() as connection:
        rows = connection.execute(
            sa.select(sweeps_table).order_by(sweeps_table.c.id.desc()).limit(limit)
        ).all()
    return [_plain(dict(row._mapping)) for row in rows]


def record_instance(engine: Engine, instance_id: str, *, state: str, root: str,
                    stats: Mapping[str, Any], now: datetime, started_at: datetime) -> None:
    """Insert or refresh this instance's heartbeat row."""
    table = instances_table
    values = {
        "heartbeat_at": db.to_db_time(now),
        "state": state,
        "stats": json.dumps(dict(stats), default=str),
        "stopped_at": db.to_db_time(now) if state == "stopped" else None,
    }
    with engine.begin() as connection:
        updated = connection.execute(
            sa.update(table).where(table.c.instance_id == instance_id).values(values)
        ).rowcount
        if not updated:
            connection.execute(
                sa.insert(table).values(
                    instance_id=instance_id,
                    hostname=socket.gethostname()[:255],
                    pid=os.getpid(),
                    started_at=db.to_db_time(started_at),
                    root=storable(root),
                    **values,
                )
            )


def instances(engine: Engine, *, now: datetime, stale_after: timedelta) -> list[dict[str, Any]]:
    """Known instances, newest heartbeat first, each marked live or not."""
    with db.read_only(engine).connect() as connection:
        rows = connection.execute(
            sa.select(instances_table).order_by(instances_table.c.heartbeat_at.desc()).limit(50)
        ).all()
    result = []
    for row in rows:
        item = _plain(dict(row._mapping))
        heartbeat = db.from_db_time(row.heartbeat_at)
        item["live"] = (
            row.state != "stopped" and heartbeat is not None and now - heartbeat <= stale_after
        )
        item["stats"] = json.loads(row.stats) if row.stats else {}
        result.append(item)
    return result


def _plain(item: dict[str, Any]) -> dict[str, Any]:
    for key, value in item.items():
        if isinstance(value, datetime):
            moment = db.from_db_time(value)
            item[key] = moment.isoformat() if moment else None
    return item
