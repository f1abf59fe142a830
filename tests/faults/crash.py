"""Crash: kill -9 the daemon at random points of deletion bursts and sweeps, restart, check.

One round: the daemon is running and has swept; a seeded burst of steps runs — app directories
removed (``rm -rf``, moved out of the root, renamed), whole model directories removed, SIGHUP
(a sweep) — and at a seeded step, after a seeded delay, the daemon is killed with SIGKILL. The
rest of the burst happens while it is dead. Then, on the database as the kill left it: every app
fully handled or untouched, never half (:meth:`World.check`). New apps are created while it is
down, it is restarted (with a seeded batch size, so a burst is one or many transactions), and
after its start-up sweep: still all-or-nothing, every removed app handled, every remaining row
has its directory — the database matches the disk — and the journal is complete.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import ClassVar

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from faults.daemon import Daemon, init_db
from faults.harness import Run, scenario
from faults.servers import probe_engine, scratch_database
from faults.world import SLUGS, Tally, World

APP_NAME = "fswatch-sync-under-fault"
POPULATION = 36  # apps alive at the start of each round
MIN_ALIVE = 8  # a burst never takes the tree below this (the sweep's guard would rightly refuse)
BATCH_SIZES = ("1", "2", "5", "500")
GAPS = (0.0, 0.0, 0.0, 0.001, 0.003, 0.01)


def daemon_settings(root: Path, url: str) -> dict[str, str]:
    return {
        "FSWATCH_SYNC_ROOT": str(root),
        "FSWATCH_SYNC_DATABASE_URL": url,
        "FSWATCH_SYNC_INTERVAL_SECONDS": "3600",
        "FSWATCH_SYNC_APP_GRACE_MINUTES": "0",
        # The guard's job is tested elsewhere; a burst may well remove half of a small tree.
        "FSWATCH_SYNC_MAX_DELETE_FRACTION": "1",
        # No task here is stuck or old: only removals may change tasks.
        "FSWATCH_SYNC_RUNNING_TIMEOUT_MINUTES": "100000",
        "FSWATCH_SYNC_PENDING_TIMEOUT_MINUTES": "100000",
        "FSWATCH_SYNC_OBSERVER": "native",
        # A killed sweeper's lease blocks the next start-up sweep until it expires: keep the
        # wait short (sweeps here take milliseconds; the lease is renewed at every commit).
        "FSWATCH_SYNC_LEASE_SECONDS": "2",
        "FSWATCH_SYNC_LOG_LEVEL": "INFO",
        "PGAPPNAME": APP_NAME,  # how PostgreSQL tells the daemon's connections from others
    }


Step = tuple[str, str]  # (action, argument)


def plan_burst(rng: random.Random, world: World) -> list[Step]:
    """A seeded burst that keeps at least MIN_ALIVE app directories."""
    alive = {slug: list(keys) for slug, keys in world.alive_by_slug().items()}
    remaining = sum(len(keys) for keys in alive.values())
    steps: list[Step] = []
    for _ in range(rng.randint(3, 12)):
        roll = rng.random()
        if roll < 0.2:
            steps.append(("hup", ""))
        elif roll < 0.32 and len(alive) > 1:
            slug = rng.choice(sorted(alive))
            if remaining - len(alive[slug]) >= MIN_ALIVE:
                remaining -= len(alive.pop(slug))
                steps.append(("model-" + rng.choice(("rmtree", "rmtree", "move")), slug))
        elif remaining > MIN_ALIVE:
            slug = rng.choice(sorted(alive))
            key = rng.choice(alive[slug])
            alive[slug].remove(key)
            if not alive[slug]:
                del alive[slug]
            remaining -= 1
            how = rng.choice(("rmtree", "rmtree", "rmtree", "move", "rename"))
            steps.append((f"app-{how}", f"{key.model_slug}/{key.app_number}"))
    return steps


def apply_step(step: Step, world: World, daemon: Daemon) -> int:
    """Do one step; the number of app directories it took away."""
    action, argument = step
    if action == "hup":
        if daemon.alive():
            daemon.hup()
        return 0
    if action.startswith("model-"):
        return len(world.remove_model(argument, action.removeprefix("model-")))
    slug, number = argument.rsplit("/", 1)
    key = next(k for k in world.apps if k.model_slug == slug and k.app_number == int(number))
    world.remove_app(key, action.removeprefix("app-"))
    return 1


def replenish(rng: random.Random, world: World, fresh_slugs: list[str]) -> None:
    missing = POPULATION - len(world.alive())
    if missing <= 0:
        return
    if rng.random() < 0.3:
        fresh_slugs.append(f"model{len(fresh_slugs) + 1}_gen")
        slugs = [fresh_slugs[-1]]
    else:
        slugs = [rng.choice(SLUGS + tuple(fresh_slugs))]
    keys = world.new_keys(slugs, missing)
    world.seed(keys)


class TransactionProbe:
    """Whether the daemon has a write transaction open, asked just before the kill.

    PostgreSQL: a backend of the daemon (known by its application_name) that is ``active`` or
    ``idle in transaction``. MariaDB: an InnoDB transaction of a connection to the scenario's
    database. SQLite: another connection cannot take the write lock without waiting. Evidence
    that kills land inside transactions, not only between them.
    """

    QUERIES: ClassVar[dict[str, str]] = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
        f" '{APP_NAME}' AND state IN ('active', 'idle in transaction')",
        "mysql": "SELECT count(*) FROM information_schema.INNODB_TRX t"
        " JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id"
        " WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID()",
    }

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = sa.make_url(url).get_backend_name()
        self._admin: sa.Connection | None = None
        if self.backend in self.QUERIES:
            engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
            self._admin = engine.connect()

    def open_transaction(self) -> bool:
        if self._admin is not None:
            return bool(self._admin.exec_driver_sql(self.QUERIES[self.backend]).scalar())
        if self.backend != "sqlite":
            return False
        database = sa.make_url(self.url).database
        assert database
        probe = sqlite3.connect(database, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()


def crash_kill9(run: Run) -> str:
    assert run.backend is not None
    rng = run.rng()
    root = run.workdir / "generated" / "apps"
    root.mkdir(parents=True)
    stats: Counter[str] = Counter()
    with scratch_database(run.backend, run.workdir) as url:
        daemon = Daemon(run.workdir, daemon_settings(root, url))
        init_db(url)
        engine = probe_engine(url)
        world = World(root, engine, run.workdir / "trash")
        world.seed(world.new_keys(SLUGS, POPULATION // len(SLUGS)))
        fresh: list[str] = []
        probe = TransactionProbe(url)
        try:
            daemon.start(FSWATCH_SYNC_BATCH_SIZE=rng.choice(BATCH_SIZES))
            daemon.wait_ready(engine)
            world.check(world.snapshot(), settled=True)
            for round_number in range(run.rounds):
                steps = plan_burst(rng, world)
                kill_at = rng.randrange(len(steps) + 1)
                delay = rng.choice((0.0, rng.uniform(0, 0.01), rng.uniform(0, 0.08)))
                taken_before_kill = 0
                for index, step in enumerate(steps):
                    if index == kill_at:
                        daemon.wait_exit(delay)  # the kill point
                        stats["in-tx"] += probe.open_transaction()
                        daemon.kill9()
                    taken = apply_step(step, world, daemon)
                    if daemon.alive():
                        taken_before_kill += taken
                    daemon.wait_exit(rng.choice(GAPS))
                if daemon.alive():
                    daemon.wait_exit(delay)
                    stats["in-tx"] += probe.open_transaction()
                    daemon.kill9()
                sweeping = [r for r in daemon.sweeps(engine) if r["finished_at"] is None]
                stats["in-sweep"] += bool(sweeping)
                tally = _check(world, round_number, "after kill -9", daemon, settled=False)
                handled_now = tally.handled - stats["handled so far"]
                stats["handled so far"] = tally.handled
                if taken_before_kill == 0:
                    stats["before"] += 1
                elif handled_now == 0:
                    stats["unacted"] += 1
                elif tally.waiting:
                    stats["mid"] += 1
                else:
                    stats["after"] += 1
                stats["left"] += tally.waiting
                # While it is down: a few more removals, and new apps.
                for step in plan_burst(rng, world)[: rng.randint(0, 2)]:
                    apply_step(step, world, daemon)
                replenish(rng, world, fresh)
                daemon.start(FSWATCH_SYNC_BATCH_SIZE=rng.choice(BATCH_SIZES))
                if rng.random() < 0.3:
                    # A kill while it starts: perhaps in its start-up sweep, which has the
                    # removals made while it was down to do.
                    daemon.wait_exit(rng.uniform(0.1, 1.5))  # the kill point
                    stats["in-tx"] += probe.open_transaction()
                    daemon.kill9()
                    daemon.instance_id = daemon.find_instance(engine)
                    in_sweep = [r for r in daemon.sweeps(engine) if r["finished_at"] is None]
                    stats["startup"] += 1
                    stats["startup-sweep"] += bool(in_sweep)
                    _check(world, round_number, "after a kill during start-up", daemon,
                           settled=False)
                    daemon.start(FSWATCH_SYNC_BATCH_SIZE=rng.choice(BATCH_SIZES))
                daemon.wait_ready(engine)
                if "skipped: another instance is sweeping" in daemon.log_text():
                    stats["lease-wait"] += 1
                tally = _check(world, round_number, "after restart", daemon, settled=True)
                stats["handled so far"] = tally.handled
            status = daemon.stop()
            assert status == 0, f"SIGTERM: exit status {status}"
        finally:
            daemon.close()
            probe.close()
            engine.dispose()
    kills = run.rounds + stats["startup"]
    return (
        f"{kills} kill -9s, {stats['handled so far']} apps removed: every one fully handled and"
        f" journalled, none half-done, DB = disk after every restart. Kills landed: before the"
        f" burst {stats['before']}, before the daemon acted {stats['unacted']}, mid-burst"
        f" {stats['mid']}, after it {stats['after']}, during a sweep {stats['in-sweep']},"
        f" during start-up {stats['startup']} (in its sweep {stats['startup-sweep']}), inside"
        f" an open write transaction {stats['in-tx']}; {stats['left']} removals left to the"
        f" restart's sweep; {stats['lease-wait']} restarts waited for a dead sweeper's lease"
    )


def _check(world: World, round_number: int, when: str, daemon: Daemon, *, settled: bool) -> Tally:
    try:
        return world.check(world.snapshot(), settled=settled)
    except AssertionError as exc:
        raise AssertionError(
            f"round {round_number + 1}, {when}: {exc} | daemon log: {daemon.log_tail(6)}"
        ) from None


SUMMARY = (
    "the daemon (subprocess) is killed with SIGKILL at seeded points of bursts of deletions"
    " (rm -rf, move out, rename, whole model dirs) and SIGHUP sweeps, with seeded batch sizes,"
    " and now and then again while it restarts; after each kill every app is fully handled or"
    " untouched, after each restart's start-up sweep (grace 0) the database matches the disk"
    " and the journal is complete"
)
scenario("crash-kill9", backends=("sqlite",), quick=3, long=150, summary=SUMMARY)(crash_kill9)
scenario("crash-kill9", backends=("postgres",), quick=2, long=40, summary=SUMMARY)(crash_kill9)
scenario("crash-kill9", backends=("mysql",), quick=2, long=40, summary=SUMMARY)(crash_kill9)
