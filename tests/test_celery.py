"""Sweeps as a beat-scheduled Celery task, in real processes: two workers and beat on the real
Redis (and RabbitMQ for the first test), the database on the real PostgreSQL.

- one sweep per tick, each by one worker, over 20 ticks (6 on RabbitMQ), with the sweep events
  seen by an event receiver;
- ticks that land while another worker sweeps return "skipped" at once (the lease), and no two
  sweeps overlap;
- a worker killed (SIGKILL) before committing a removal transaction leaves every app whole or
  untouched, and the next tick after its lease runs out completes the job.

Redis and RabbitMQ must be up (under CI these tests fail instead of skipping when they are not).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from celery_app import make_app
from conftest import REQUIRE_SERVERS, database_url_for
from helpers import (
    SeededApp,
    app_state,
    init_database,
    make_settings,
    probe_engine,
    seed_app,
    sweep_rows,
    wait_until,
)
from sqlalchemy.engine import Engine

from fswatch_sync import signals
from fswatch_sync.celery_tasks import (
    BEAT_ENTRY,
    SWEEP_TASK,
    TRIGGER,
    _Stores,
    register,
    run_sweep,
)
from fswatch_sync.layout import AppKey
from fswatch_sync.records import Lease
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store

REDIS_URL = os.environ.get("FSWATCH_SYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get(
    "FSWATCH_SYNC_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
TESTS = Path(__file__).resolve().parent
SLUG = "openai_gpt-4"


def _unreachable(message: str) -> None:
    if REQUIRE_SERVERS:
        pytest.fail(f"required service missing: {message}")
    pytest.skip(message)


@pytest.fixture
def broker_url(request: pytest.FixtureRequest) -> str:
    """Redis unless the test asks for RabbitMQ (``indirect`` parametrisation)."""
    kind = getattr(request, "param", "redis")
    if kind == "redis":
        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        except redis.RedisError as exc:
            _unreachable(f"Redis unreachable at {REDIS_URL}: {exc}")
        return REDIS_URL
    try:
        with make_app(RABBITMQ_URL, "probe").connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure to reach the broker means "not here"
        _unreachable(f"RabbitMQ unreachable at {RABBITMQ_URL}: {exc}")
    return RABBITMQ_URL


@pytest.fixture
def pg_url(tmp_path: Path, server_databases: Any) -> str:
    url = database_url_for("postgres", tmp_path, server_databases)
    init_database(url)
    return url


@dataclass
class World:
    """Worker and beat processes of one test, on a Redis prefix and queue of its own."""

    tmp: Path
    broker: str
    database_url: str
    root: Path
    settings: dict[str, str]
    interval: float
    prefix: str = field(default_factory=lambda: f"fswatch-test-{uuid.uuid4().hex[:10]}")
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.tmp / "celery-log.jsonl"

    def environ(self, extra: dict[str, str]) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FSWATCH_")}
        environ.update(
            PYTHONPATH=os.pathsep.join([str(TESTS), environ.get("PYTHONPATH", "")]),
            FSWATCH_TEST_BROKER=self.broker,
            FSWATCH_TEST_PREFIX=self.prefix,
            FSWATCH_TEST_INTERVAL=str(self.interval),
            FSWATCH_TEST_LOG=str(self.log),
            FSWATCH_SYNC_DATABASE_URL=self.database_url,
            FSWATCH_SYNC_ROOT=str(self.root),
            **{f"FSWATCH_SYNC_{k.upper()}": v for k, v in self.settings.items()},
            **extra,
        )
        return environ

    def start(self, name: str, args: list[str], extra: dict[str, str] | None = None) -> None:
        output = open(self.tmp / f"{name}.out", "wb")  # noqa: SIM115 - the process owns it
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", *args],
            cwd=self.tmp, env=self.environ(extra or {}), stdout=output, stderr=output,
        )
        output.close()

    def start_workers(self, count: int = 2, extra: dict[str, str] | None = None) -> None:
        for index in range(count):
            self.start(f"worker{index}", [
                "worker", "--pool=solo", "-Q", f"{self.prefix},{self.own_queue(index)}",
                "-n", f"w{index}-{self.prefix}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
            ], extra)
        wait_until(lambda: len(self.lines("ready")) >= count, 60, "workers ready",
                   on_timeout=self.outputs)

    def own_queue(self, index: int) -> str:
        return f"{self.prefix}.w{index}"

    def warm_up(self, count: int = 2) -> list[str]:
        """One sweep on each worker, sent to it directly: a worker's first sweep opens its
        engine and checks the tables, which can outlast a short beat interval."""
        app = make_app(self.broker, self.prefix)
        ids = []
        for index in range(count):  # one after the other: together, one would be skipped
            ids.append(str(app.send_task(SWEEP_TASK, queue=self.own_queue(index)).id))
            wait_until(lambda: ids[-1] in self.outcomes(), 60, "a warm-up sweep",
                       on_timeout=self.outputs)
        assert [self.outcomes()[i][0]["status"] for i in ids] == ["swept"] * count
        return ids

    def start_beat(self) -> None:
        self.start("beat", ["beat", "-s", str(self.tmp / "beat-schedule"), "--pidfile=",
                            "-l", "INFO"])

    def lines(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        found = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [line for line in found if kind is None or line["kind"] == kind]

    def ticks(self) -> list[str]:
        return [str(line["id"]) for line in self.lines("sent")]

    def outcomes(self) -> dict[str, list[dict[str, Any]]]:
        """Per task id: its done/expired lines (one each, when every tick ran once)."""
        result: dict[str, list[dict[str, Any]]] = {}
        starts = {line["id"]: line["t"] for line in self.lines("start")}
        for line in self.lines():
            if line["kind"] in ("done", "expired", "revoked"):
                line["seconds"] = line["t"] - starts.get(line["id"], line["t"])
                result.setdefault(str(line["id"]), []).append(line)
        return result

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def stop_all(self) -> None:
        """Cold shutdown (SIGQUIT), all at once: by now every task the test waited for has
        answered, and a warm shutdown lingers for seconds closing an AMQP connection."""
        processes = [self.processes.pop(name) for name in list(self.processes)]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGQUIT)
        deadline = time.monotonic() + 5
        for process in processes:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def outputs(self) -> str:
        return " | ".join(
            f"{path.name}: {path.read_text(errors='replace')[-1500:]}"
            for path in sorted(self.tmp.glob("*.out"))
        )


@pytest.fixture
def world(tmp_path: Path, broker_url: str, pg_url: str) -> Iterator[World]:
    root = tmp_path / "generated" / "apps"
    root.mkdir(parents=True)
    made = World(tmp=tmp_path, broker=broker_url, database_url=pg_url, root=root,
                 settings={}, interval=0.5)
    try:
        yield made
    finally:
        made.stop_all()
        if broker_url.startswith("redis"):
            client = redis.Redis.from_url(broker_url)
            for key in client.scan_iter(f"{made.prefix}:*"):
                client.delete(key)
            client.close()
        else:
            with make_app(broker_url, made.prefix).connection_for_write() as connection:
                for queue in (made.prefix, made.own_queue(0), made.own_queue(1)):
                    connection.default_channel.queue_delete(queue)


def seed(engine: Engine, root: Path, *, orphans: int, present: int) -> list[SeededApp]:
    apps = [seed_app(engine, root, AppKey(SLUG, n), on_disk=False) for n in range(1, orphans + 1)]
    for n in range(100, 100 + present):
        seed_app(engine, root, AppKey(SLUG, n))
    return apps


def states(engine: Engine, apps: list[SeededApp]) -> list[str]:
    return [app_state(engine, app, "sweep") for app in apps]


def celery_sweeps(engine: Engine) -> list[dict[str, Any]]:
    return [row for row in sweep_rows(engine) if row["trigger"] == TRIGGER]


def assert_disjoint(sweeps: list[dict[str, Any]]) -> None:
    spans = sorted((row["started_at"], row["finished_at"]) for row in sweeps)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end is not None and end <= start, f"two sweeps overlapped: {spans}"


class EventLog:
    """The sweep events the workers send, as any Celery event consumer (Flower) gets them."""

    def __init__(self, broker: str, prefix: str) -> None:
        self.app = make_app(broker, prefix)
        self.events: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(
                connection, handlers={"*": self.events.append}
            )
            self.subscribed.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventLog:
        self._thread.start()
        assert self.subscribed.wait(15)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)

    def of(self, kind: str) -> dict[str, dict[str, Any]]:
        return {str(e["uuid"]): e for e in list(self.events) if e.get("type") == kind}


@pytest.mark.parametrize(
    ("broker_url", "count"), [("redis", 20), ("rabbitmq", 6)], indirect=["broker_url"]
)
def test_one_sweep_per_tick_with_two_workers(world: World, count: int) -> None:
    with probe_engine(world.database_url) as engine:
        with EventLog(world.broker, world.prefix) as events:
            world.start_workers(2)
            warm_up = world.warm_up()
            orphans = seed(engine, world.root, orphans=3, present=6)
            world.start_beat()
            wait_until(lambda: len(world.ticks()) >= count, 60, f"{count} ticks",
                       on_timeout=world.outputs)
            world.stop("beat")
            ticks = world.ticks()
            wait_until(lambda: set(ticks) <= set(world.outcomes()), 30, "every tick's outcome",
                       on_timeout=world.outputs)
            wait_until(lambda: set(events.of("task-sweep-finished")) >= set(ticks), 15,
                       "a sweep-finished event per tick")
        world.stop_all()

        outcomes = world.outcomes()
        per_tick = {tick: [line["status"] for line in outcomes[tick]] for tick in ticks}
        by_task = {
            str(row["instance_id"]).removeprefix("celery-"): row for row in celery_sweeps(engine)
        }
        assert sorted(by_task.pop(task_id)["orphan_apps"] for task_id in warm_up) == [0, 0]
        sweeps = list(by_task.values())
        workers = {line["pid"] for tick in ticks for line in outcomes[tick]}
        print(f"\ncelery ticks ({world.broker.split(':')[0]}): {len(ticks)} ticks every"
              f" {world.interval}s; sweep rows per tick"
              f" {[sum(1 for r in sweeps if r['instance_id'] == f'celery-{t}') for t in ticks]};"
              f" outcomes {sorted({s for lines in per_tick.values() for s in lines})};"
              f" {len(workers)} workers took ticks")

        assert len(ticks) >= count
        assert per_tick == {tick: ["swept"] for tick in ticks}
        assert sorted(by_task) == sorted(ticks)  # exactly one sweep row per tick, no other
        assert all(row["outcome"] == "ok" for row in sweeps)
        assert_disjoint(sweeps)
        assert len(workers) == 2  # whichever worker is free takes the tick
        assert sum(row["orphan_apps"] for row in sweeps) == 3
        assert states(engine, orphans) == ["removed"] * 3
        assert len(sweep_rows(engine)) == len(sweeps) + len(warm_up)

        finished = events.of("task-sweep-finished")
        started = events.of("task-sweep-started")
        assert set(started) >= set(ticks)
        assert sum(finished[tick]["orphan_apps"] for tick in ticks) == 3
        assert all(finished[tick]["dry_run"] is False for tick in ticks)


def test_ticks_during_a_sweep_are_skipped_at_once(world: World) -> None:
    hold = 1.2  # every sweep holds the lease this long: two ticks land meanwhile
    world.settings["lease_seconds"] = "10"
    with probe_engine(world.database_url) as engine:
        world.start_workers(2, {"FSWATCH_TEST_HOLD_SECONDS": str(hold)})
        world.start_beat()
        wait_until(lambda: len(world.ticks()) >= 7, 60, "7 ticks", on_timeout=world.outputs)
        world.stop("beat")
        ticks = world.ticks()
        wait_until(lambda: set(ticks) <= set(world.outcomes()), 30, "every tick's outcome",
                   on_timeout=world.outputs)
        world.stop_all()

        outcomes = world.outcomes()
        statuses = {tick: [line["status"] for line in outcomes[tick]] for tick in ticks}
        swept = [tick for tick in ticks if statuses[tick] == ["swept"]]
        skipped = [tick for tick in ticks if statuses[tick] == ["skipped"]]
        sweeps = celery_sweeps(engine)

        assert all(len(lines) == 1 for lines in statuses.values()), statuses
        assert len(swept) >= 2 and len(skipped) >= 2, statuses
        assert set(swept) | set(skipped) | {
            t for t in ticks if statuses[t] == ["expired"]
        } == set(ticks)
        assert sorted(str(r["instance_id"]).removeprefix("celery-") for r in sweeps) == sorted(
            swept
        )
        assert_disjoint(sweeps)
        assert all(row["finished_at"] - row["started_at"] >= timedelta(seconds=hold)
                   for row in sweeps)
        # "At once": a skipped tick never waits for the sweep it lost to.
        assert max(outcomes[tick][0]["seconds"] for tick in skipped) < hold / 2


def test_worker_killed_mid_sweep_leaves_nothing_half_done(world: World) -> None:
    lease = 2.0
    world.settings.update(lease_seconds=str(lease), batch_size="2")
    pause = world.tmp / "paused"
    with probe_engine(world.database_url) as engine:
        orphans = seed(engine, world.root, orphans=6, present=8)
        world.start_workers(2, {"FSWATCH_TEST_PAUSE": str(pause)})
        world.start_beat()
        wait_until(pause.exists, 60, "a sweep paused before its second commit",
                   on_timeout=world.outputs)
        wait_until(lambda: pause.read_text().strip() != "", 5, "the paused pid")
        victim = int(pause.read_text())
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: not any(
            p.pid == victim and p.poll() is None for p in world.processes.values()
        ), 10, "the killed worker gone")

        # The first removal transaction committed, the second died before its commit.
        after_kill = states(engine, orphans)
        assert after_kill == ["removed"] * 2 + ["untouched"] * 4, after_kill

        wait_until(lambda: states(engine, orphans) == ["removed"] * 6, 30,
                   "the next sweep to finish the job", on_timeout=world.outputs)
        takeover = time.monotonic() - killed_at
        kill_tick = next(line["id"] for line in world.lines("start") if line["pid"] == victim
                         and line["id"] not in world.outcomes())
        world.stop("beat")
        ticks = world.ticks()
        # Ticks after the kill all go to the survivor: once the last ones are answered, so is
        # every tick that will ever be.
        wait_until(lambda: set(ticks[-3:]) <= set(world.outcomes()), 30,
                   "the last ticks' outcomes", on_timeout=world.outputs)
        world.stop_all()

        sweeps = celery_sweeps(engine)
        killed = [row for row in sweeps if row["instance_id"] == f"celery-{kill_tick}"]
        completing = [row for row in sweeps if row["orphan_apps"] == 4]
        outcomes = world.outcomes()
        skipped = [t for t in ticks if [line["status"] for line in outcomes.get(t, [])]
                   == ["skipped"]]
        print(f"\ncelery take-over: worker killed before its 2nd removal commit; all 6 orphans"
              f" removed {takeover:.2f}s later (lease {lease}s, interval {world.interval}s);"
              f" {len(skipped)} ticks skipped meanwhile")

        assert [(r["outcome"], r["finished_at"]) for r in killed] == [("running", None)]
        assert len(completing) == 1 and completing[0]["outcome"] == "ok"
        assert completing[0]["instance_id"] != killed[0]["instance_id"]
        # Ticks while the dead worker's lease ran were turned away, not run beside it.
        assert skipped
        assert takeover < lease + 4 * world.interval + 5
        # The killed task is gone with its worker (acknowledged on receipt; the next tick is its
        # retry), and at most one message it had already taken with it.
        lost = set(ticks) - set(outcomes)
        assert kill_tick in lost and len(lost) <= 2, lost
        assert_disjoint([r for r in sweeps if r["finished_at"] is not None])
        with engine.connect() as connection:
            assert connection.execute(
                sa.text("SELECT count(*) FROM generated_applications")
            ).scalar_one() == 8


# -- in-process: the task's body and its registration, without a broker ----------------------


class RecordingTask:
    """What run_sweep uses of a bound Celery task: its request id, and send_event."""

    def __init__(self, task_id: str) -> None:
        self.request = SimpleNamespace(id=task_id)
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_event(self, type_: str, **fields: Any) -> None:
        self.sent.append((type_, fields))


def test_task_body_sweeps_and_forwards_the_sweep_signals(
    url: str, probe: Engine, apps_root: Path
) -> None:
    orphan = seed_app(probe, apps_root, AppKey(SLUG, 1), on_disk=False)
    for n in range(2, 4):
        seed_app(probe, apps_root, AppKey(SLUG, n))
    settings = make_settings(apps_root, url)
    store = Store.from_settings(settings)
    task = RecordingTask("t-1")
    try:
        result = run_sweep(task, store, settings)
    finally:
        store.engine.dispose()

    assert (result["status"], result["orphan_apps"], result["instance_id"]) == (
        "swept", 1, "celery-t-1"
    )
    assert [kind for kind, _ in task.sent] == ["task-sweep-started", "task-sweep-finished"]
    assert task.sent[0][1] == {"trigger": TRIGGER, "dry_run": False}
    assert task.sent[1][1]["orphan_apps"] == 1 and task.sent[1][1]["orphan_tasks"] == 2
    assert app_state(probe, orphan, "sweep") == "removed"
    assert [(r["instance_id"], r["trigger"]) for r in sweep_rows(probe)] == [
        ("celery-t-1", TRIGGER)
    ]
    # Only this sweeper's signals were forwarded, and the receivers are gone afterwards.
    assert not signals.sweep_started.receivers and not signals.sweep_finished.receivers


def test_task_body_returns_skipped_at_once_while_the_lease_is_held(
    url: str, probe: Engine, apps_root: Path
) -> None:
    orphan = seed_app(probe, apps_root, AppKey(SLUG, 1), on_disk=False)
    seed_app(probe, apps_root, AppKey(SLUG, 2))
    settings = make_settings(apps_root, url, lease_seconds=600.0)
    store = Store.from_settings(settings)
    holder = Lease(store.engine, "another-instance", duration_seconds=600.0)
    assert holder.try_acquire()
    task = RecordingTask("t-2")
    try:
        started = time.monotonic()
        result = run_sweep(task, store, settings)
        took = time.monotonic() - started
    finally:
        store.engine.dispose()

    assert result["status"] == "skipped" and "another-instance" in result["reason"]
    assert took < 2.0
    assert task.sent == []
    assert app_state(probe, orphan, "sweep") == "untouched"
    assert sweep_rows(probe) == []


def test_register_adds_the_task_and_an_expiring_beat_entry(apps_root: Path) -> None:
    app = Celery("host", broker="memory://", set_as_current=False)
    settings = make_settings(apps_root, "sqlite://", interval_seconds=900.0)
    task = register(app, settings, queue="maintenance")
    app.finalize()
    assert task.name == SWEEP_TASK and app.tasks[SWEEP_TASK].app is app
    assert app.conf.beat_schedule[BEAT_ENTRY] == {
        "task": SWEEP_TASK,
        "schedule": timedelta(seconds=900),
        "args": (),
        "kwargs": {},
        "options": {"expires": 900.0, "queue": "maintenance"},
    }

    unscheduled = Celery("other", broker="memory://", set_as_current=False)
    register(unscheduled, settings, schedule=False)
    unscheduled.finalize()
    assert SWEEP_TASK in unscheduled.tasks
    assert not unscheduled.conf.beat_schedule


def test_each_worker_process_opens_its_own_store(
    url: str, apps_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefork child must not use the engine (and pooled connections) of the process it was
    forked from: the store is made again when the pid changes, once per process."""
    made: list[Settings] = []

    def settings() -> Settings:
        made.append(make_settings(apps_root, url))
        return made[-1]

    stores = _Stores(settings)
    parent, _ = stores.get()
    assert stores.get()[0] is parent and len(made) == 1
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as seen from a forked child
    child, child_settings = stores.get()
    try:
        assert child is not parent and child.engine is not parent.engine
        assert child_settings is made[1] and stores.get()[0] is child
    finally:
        parent.engine.dispose()
        child.engine.dispose()
