"""Outages: the database goes away under the running daemon while removals are flowing.

* ``outage-pg-terminate``: an admin connection terminates every other backend of the scenario's
  PostgreSQL database (``pg_terminate_backend``) again and again during a burst of deletions.
* ``outage-mysql-kill``: the same with MariaDB's ``KILL <id>`` for every connection of the
  scenario's database found in ``information_schema.PROCESSLIST``.
* ``outage-sqlite-locked``: another connection holds the SQLite file's write lock
  (``BEGIN IMMEDIATE``) for seconds while the deletions happen.
* ``outage-memory``: a long SQLite lock while far more hints arrive than the reactor may queue:
  the queue stays within its bound, the daemon's memory stays flat, and every app is handled
  once the lock goes.

In every round, once the fault stops nobody helps — no SIGHUP, no sweep requested from outside —
and every deleted app must end up fully handled (row gone, active tasks cancelled, journalled)
while every other app is untouched: retried, nothing forgotten.
"""

from __future__ import annotations

import json
import random
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import sqlalchemy as sa
from helpers import wait_until
from sqlalchemy.pool import NullPool

from faults.crash import APP_NAME, daemon_settings
from faults.daemon import Daemon, init_db
from faults.harness import Run, scenario
from faults.servers import probe_engine, robust, scratch_database
from faults.world import SLUGS, World

CONVERGE_SECONDS = 90.0


class Disruptor:
    """Calls ``strike`` from a thread of its own, at seeded intervals, until stopped."""

    def __init__(self, strike: Callable[[], int], rng: random.Random,
                 period: tuple[float, float]) -> None:
        self.strike = strike
        self.rng = random.Random(rng.random())
        self.period = period
        self.hits = 0
        self.strikes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disruptor", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(*self.period)):
            try:
                self.hits += self.strike()
                self.strikes += 1
            except Exception as exc:  # the disruptor's own connection may hiccup; keep going
                self.errors.append(str(exc).splitlines()[0] if str(exc) else repr(exc))

    def __enter__(self) -> Disruptor:
        self._thread.start()
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@dataclass
class OutageStats:
    removed: int = 0
    hits: int = 0
    strikes: int = 0
    converge: list[float] = field(default_factory=list)

    def converge_text(self) -> str:
        if not self.converge:
            return "-"
        ordered = sorted(self.converge)
        return f"max {ordered[-1]:.1f} s, median {ordered[len(ordered) // 2]:.1f} s"


def _burst(rng: random.Random, world: World, daemon: Daemon, count: int, spread: float,
           keep: int) -> int:
    """Take ``count`` app directories away (rm -rf, move out, rename; now and then a whole
    model directory) over about ``spread`` seconds, with a SIGHUP now and then. Returns the
    number of apps taken away."""
    taken = 0
    for _ in range(count):
        alive = world.alive_by_slug()
        total = sum(len(keys) for keys in alive.values())
        if total <= keep:
            break
        roll = rng.random()
        if roll < 0.1:
            daemon.hup()
        elif roll < 0.18 and len(alive) > 1:
            slug = min(alive, key=lambda s: len(alive[s]))
            if total - len(alive[slug]) >= keep:
                taken += len(world.remove_model(slug, rng.choice(("rmtree", "move"))))
        else:
            key = rng.choice(sorted(k for keys in alive.values() for k in keys))
            world.remove_app(key, rng.choice(("rmtree", "rmtree", "move", "rename")))
            taken += 1
        daemon.wait_exit(rng.uniform(0, 2 * spread / max(count, 1)))  # pacing the burst
    return taken


def _converge(world: World, daemon: Daemon, what: str) -> float:
    """Until every taken-away app is handled (no help from outside); seconds it took."""
    started = time.monotonic()
    last: list[str] = []

    def settled() -> bool:
        if not daemon.alive():
            raise AssertionError(f"the daemon died: {daemon.log_tail()}")
        tally = robust(lambda: world.check(world.snapshot()))
        last[:] = [f"{tally.waiting} app(s) still waiting"]
        return tally.waiting == 0

    wait_until(settled, CONVERGE_SECONDS, f"every removed app to be handled after {what}",
               interval=0.05, on_timeout=lambda: f"{last[0] if last else ''}; {daemon.log_tail(4)}")
    elapsed = time.monotonic() - started
    world.check(world.snapshot(), settled=True)
    return elapsed


def _server_outage(run: Run, make_strike: Callable[[str], AdminStrike], label: str) -> str:
    assert run.backend is not None
    rng = run.rng()
    root = run.workdir / "generated" / "apps"
    root.mkdir(parents=True)
    stats = OutageStats()
    population = 24 if run.quick else 60
    with scratch_database(run.backend, run.workdir) as url:
        settings = daemon_settings(root, url)
        daemon = Daemon(run.workdir, settings)
        init_db(url)
        engine = probe_engine(url)
        world = World(root, engine, run.workdir / "trash")
        world.seed(world.new_keys(SLUGS, population // len(SLUGS)))
        strike = make_strike(url)
        try:
            daemon.start(FSWATCH_SYNC_BATCH_SIZE=rng.choice(("1", "3", "500")))
            daemon.wait_ready(engine)
            for round_number in range(run.rounds):
                with Disruptor(strike, rng, (0.005, 0.05)) as disruptor:
                    stats.removed += _burst(rng, world, daemon, rng.randint(6, 16),
                                            rng.uniform(0.3, 1.5), keep=6)
                    daemon.wait_exit(rng.uniform(0.1, 0.6))  # the outage outlasts the burst
                stats.hits += disruptor.hits
                stats.strikes += disruptor.strikes
                try:
                    stats.converge.append(_converge(world, daemon, f"{label} stopped"))
                except AssertionError as exc:
                    raise AssertionError(f"round {round_number + 1}: {exc}") from None
                missing = population - len(world.alive())
                world.seed(world.new_keys([rng.choice(SLUGS)], missing))
            assert stats.hits > 0, f"no {label} hit the daemon's connections"
            status = daemon.stop()
            assert status == 0, f"SIGTERM: exit status {status}"
        finally:
            daemon.close()
            strike.close()
            engine.dispose()
    return (
        f"{stats.removed} apps removed during outages; {stats.hits} daemon connections"
        f" {label} in {stats.strikes} strikes; every app handled once it stopped (after"
        f" {stats.converge_text()}), none half-done, journal complete"
    )


# -- PostgreSQL: pg_terminate_backend -----------------------------------------------------------


class AdminStrike:
    """One fault, struck from an admin connection of its own (reconnected if it drops)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self._connection: sa.Connection | None = None

    def connection(self) -> sa.Connection:
        if self._connection is None or self._connection.closed:
            self._connection = self.engine.connect()
        return self._connection

    def __call__(self) -> int:
        try:
            return self.strike(self.connection())
        except sa.exc.DBAPIError:
            self.close()
            raise

    def strike(self, connection: sa.Connection) -> int:
        raise NotImplementedError

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.engine.dispose()


class PgTerminate(AdminStrike):
    def strike(self, connection: sa.Connection) -> int:
        rows = connection.exec_driver_sql(
            "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).all()
        return sum(1 for name, done in rows if done and name == APP_NAME)


def outage_pg_terminate(run: Run) -> str:
    return _server_outage(run, PgTerminate, "terminated (pg_terminate_backend)")


scenario(
    "outage-pg-terminate", backends=("postgres",), quick=2, long=40,
    summary="while app directories are removed, an admin connection runs `SELECT"
    " pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND"
    " pid <> pg_backend_pid()` every 5-50 ms; after it stops, with no outside help, every"
    " removed app is handled, the others untouched, the journal complete",
)(outage_pg_terminate)


# -- MariaDB: KILL --------------------------------------------------------------------------------


class MysqlKill(AdminStrike):
    def strike(self, connection: sa.Connection) -> int:
        ids = connection.exec_driver_sql(
            "SELECT ID FROM information_schema.PROCESSLIST"
            " WHERE DB = DATABASE() AND ID <> CONNECTION_ID()"
        ).scalars().all()
        killed = 0
        for ident in ids:
            try:
                connection.exec_driver_sql(f"KILL {int(ident)}")
                killed += 1
            except sa.exc.DBAPIError as exc:  # 1094: the connection ended meanwhile
                if "1094" not in str(exc.orig):
                    raise
        return killed


def outage_mysql_kill(run: Run) -> str:
    return _server_outage(run, MysqlKill, "killed (KILL <id>)")


scenario(
    "outage-mysql-kill", backends=("mysql",), quick=2, long=40,
    summary="while app directories are removed, another connection finds the daemon's"
    " connections in information_schema.PROCESSLIST and runs `KILL <id>` on each, every"
    " 5-50 ms; afterwards every removed app is handled, the others untouched",
)(outage_mysql_kill)


# -- SQLite: another writer holds the lock ---------------------------------------------------


class HeldLock:
    """Another writer: ``BEGIN IMMEDIATE`` on the SQLite file, held until released."""

    live: ClassVar[list[HeldLock]] = []  # every lock taken; the scenario's finally releases them

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA busy_timeout = 30000")
        self.connection.execute("BEGIN IMMEDIATE")
        self.since = time.monotonic()
        self.held: float | None = None
        HeldLock.live.append(self)

    @classmethod
    def release_all(cls) -> None:
        while cls.live:
            cls.live.pop().release()

    def release(self) -> float:
        """Roll back and close (again: a no-op); how long the lock was held."""
        if self.held is None:
            self.connection.execute("ROLLBACK")
            self.connection.close()
            self.held = time.monotonic() - self.since
        return self.held


def _sqlite_path(url: str) -> Path:
    database = sa.make_url(url).database
    assert database
    return Path(database)


def outage_sqlite_locked(run: Run) -> str:
    assert run.backend == "sqlite"
    rng = run.rng()
    root = run.workdir / "generated" / "apps"
    root.mkdir(parents=True)
    stats = OutageStats()
    holds: list[float] = []
    stops: list[float] = []
    population = 24 if run.quick else 60
    with scratch_database("sqlite", run.workdir) as url:
        daemon = Daemon(run.workdir, daemon_settings(root, url))
        init_db(url)
        engine = probe_engine(url)
        world = World(root, engine, run.workdir / "trash")
        world.seed(world.new_keys(SLUGS, population // len(SLUGS)))
        try:
            daemon.start(FSWATCH_SYNC_BATCH_SIZE=rng.choice(("1", "3", "500")))
            daemon.wait_ready(engine)
            for round_number in range(run.rounds):
                # Now and then in the long run, a lock outlasting the store's 60 s of retries:
                # the reactor must keep the batch and try again later.
                long_hold = not run.quick and round_number % 10 == 9
                hold = 70.0 if long_hold else rng.uniform(1.5, 3.0 if run.quick else 8.0)
                handled_before = world.check(world.snapshot()).handled
                lock = HeldLock(_sqlite_path(url))
                stats.removed += _burst(rng, world, daemon, rng.randint(6, 16),
                                        min(hold / 2, 1.5), keep=6)
                # Every third round the operator stops the daemon during the outage: it must
                # still stop cleanly within 5 s, and its successor must finish the job.
                stop_now = round_number % 3 == 1
                if stop_now:
                    began = time.monotonic()
                    status = daemon.stop()
                    stops.append(time.monotonic() - began)
                    assert status == 0 and stops[-1] <= 5.0, (
                        f"round {round_number + 1}: SIGTERM during the outage: exit status"
                        f" {status} after {stops[-1]:.1f} s"
                    )
                remaining = hold - (time.monotonic() - lock.since)
                if remaining > 0:
                    daemon.wait_exit(remaining)  # the outage's length
                during = world.check(world.snapshot())
                assert during.handled == handled_before, (
                    f"round {round_number + 1}: apps handled while another writer held the lock"
                )
                holds.append(lock.release())
                if stop_now:
                    daemon.start(FSWATCH_SYNC_BATCH_SIZE=rng.choice(("1", "3", "500")))
                    daemon.wait_ready(engine)
                try:
                    stats.converge.append(_converge(world, daemon, "the lock was released"))
                except AssertionError as exc:
                    raise AssertionError(f"round {round_number + 1}: {exc}") from None
                missing = population - len(world.alive())
                world.seed(world.new_keys([rng.choice(SLUGS)], missing))
            status = daemon.stop()
            assert status == 0, f"SIGTERM: exit status {status}"
        finally:
            HeldLock.release_all()
            daemon.close()
            engine.dispose()
    return (
        f"{stats.removed} apps removed while another connection held the write lock"
        f" ({len(holds)} holds of {min(holds):.1f}-{max(holds):.1f} s); nothing changed during"
        f" a hold, every app handled after it ({stats.converge_text()}), journal complete;"
        f" {len(stops)} SIGTERMs during a hold stopped it cleanly (slowest"
        f" {max(stops, default=0):.1f} s) and the restart finished the job"
    )


scenario(
    "outage-sqlite-locked", backends=("sqlite",), quick=2, long=30,
    summary="another connection holds `BEGIN IMMEDIATE` on the SQLite file for 1.5-8 s (in the"
    " long run every 10th hold 70 s, beyond the store's 60 s of retries) while app"
    " directories are removed; nothing changes during the hold, everything is handled after it;"
    " every third round the daemon gets SIGTERM during the hold: exit 0 within 5 s, and the"
    " restarted daemon handles what it left",
)(outage_sqlite_locked)


# -- memory: a long outage with a flood of hints ---------------------------------------------------


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _queue_depth(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        status = json.loads(response.read())
    return int(status["stats"]["queue_depth"])


def outage_memory(run: Run) -> str:
    assert run.backend == "sqlite"
    rng = run.rng()
    root = run.workdir / "generated" / "apps"
    root.mkdir(parents=True)
    apps = 1000 if run.quick else 20000
    max_pending = 200 if run.quick else 2000
    churn_seconds = 1.5 if run.quick else 30.0
    # Long: quiet for longer than two of the sweeper's attempts at the lease (10 s of retries
    # each, behind a 2 s busy timeout), and the whole lock beyond the store's 60 s of retries.
    quiet_seconds = 3.0 if run.quick else 45.0
    port = _free_port()
    peaks: list[str] = []
    with scratch_database("sqlite", run.workdir) as url:
        settings = daemon_settings(root, url)
        settings.update({
            "FSWATCH_SYNC_MAX_PENDING_EVENTS": str(max_pending),
            "FSWATCH_SYNC_HTTP": f"127.0.0.1:{port}",
        })
        daemon = Daemon(run.workdir, settings)
        init_db(url)
        engine = probe_engine(url)
        world = World(root, engine, run.workdir / "trash")
        slugs = [f"{slug}-{i}" for i in range(5) for slug in SLUGS[:2]]
        world.seed(world.new_keys(slugs, apps // len(slugs)))
        churn = root / "churn_model"
        churn.mkdir()
        try:
            for round_number in range(run.rounds):
                daemon.start()
                daemon.wait_ready(engine, timeout=120)
                baseline = max(daemon.rss_kib() for _ in range(5))
                peak_rss, peak_queue, hints = baseline, 0, 0

                def sample() -> None:
                    nonlocal peak_rss, peak_queue
                    peak_rss = max(peak_rss, daemon.rss_kib())
                    peak_queue = max(peak_queue, _queue_depth(port))

                lock = HeldLock(_sqlite_path(url))
                # Every app directory but a few goes, one by one: a hint each.
                doomed = world.alive()[: -10]
                rng.shuffle(doomed)
                for index, key in enumerate(doomed):
                    world.remove_app(key, "rmtree")
                    hints += 1
                    if index % 200 == 0:
                        sample()
                # Then a flood: app directories without rows appear and vanish for a while.
                number = 0
                flood_until = time.monotonic() + churn_seconds
                while time.monotonic() < flood_until:
                    for _ in range(200):
                        number += 1
                        path = churn / f"app{number}"
                        path.mkdir()
                        path.rmdir()
                    hints += 200
                    sample()
                # A quiet outage: whatever the daemon asked for during the flood must not be
                # dropped when it fails.
                quiet_until = time.monotonic() + quiet_seconds
                while time.monotonic() < quiet_until:
                    sample()
                    daemon.wait_exit(0.05)  # sampling pace during a fixed-length outage
                held = lock.release()
                queue_ok = peak_queue <= max_pending
                growth_mib = (peak_rss - baseline) / 1024
                assert queue_ok, f"queue reached {peak_queue} > bound {max_pending}"
                assert growth_mib < 64, f"RSS grew {growth_mib:.0f} MiB during the outage"
                seconds = _converge(world, daemon, "the lock was released")
                peaks.append(
                    f"{hints} hints in a {held:.0f} s lock: queue peak {peak_queue}"
                    f" (bound {max_pending}), RSS {baseline / 1024:.0f} -> {peak_rss / 1024:.0f}"
                    f" MiB, {len(doomed)} apps handled {seconds:.1f} s after the lock went"
                )
                status = daemon.stop()
                assert status == 0, f"SIGTERM: exit status {status}"
                if round_number + 1 < run.rounds:
                    world.seed(world.new_keys(slugs, len(doomed) // len(slugs)))
        finally:
            HeldLock.release_all()
            daemon.close()
            engine.dispose()
    return "; ".join(peaks)


scenario(
    "outage-memory", backends=("sqlite",), quick=1, long=2,
    summary="the SQLite write lock is held for a long outage (quick ~6 s, long ~100 s) while"
    " thousands of app directories are removed and then a flood of directories appear and"
    " vanish; the reactor's queue (read from /status) stays within FSWATCH_SYNC_MAX_PENDING_"
    "EVENTS, the daemon's RSS stays within 64 MiB of its baseline, and once the lock goes every"
    " removed app is handled without outside help",
)(outage_memory)
