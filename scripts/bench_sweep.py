"""Issue 2's figure: one full sweep by fswatch_sync, by the seed's algorithm, and by a floor.

The three contestants run on identical data, generated once per scale from a fixed seed:

* **fswatch_sync** — ``Sweeper.run`` through the public API with default settings (the
  journal, the lease, compare-and-set, one transaction per bounded batch, all included).
* **seed** — the system this replaces: the SQLAlchemy ORM loads every app row and
  ``os.path.exists`` checks each path; one query per active task looks for its app; rows are
  deleted and updated one by one through the ORM; the four passes in the seed's order, each
  committed once.
* **floor** — what the work costs at least: one ``os.scandir`` per model directory, then plain
  set-based SQL on the stdlib ``sqlite3`` driver (a temp table of orphan keys and one
  ``DELETE ... IN``, one ``UPDATE ... NOT EXISTS``, one ``UPDATE`` per stuck kind, one
  ``DELETE`` of old tasks), one transaction per pass, no journal, no lease, no re-checks.

The database file is built once and copied for every run; the directory tree (empty app
directories, 90 % of the apps) is built once and only read. Every run's final host rows (app
keys left, every task's id and status) are compared with the outcome computed from the generated
data, so the contestants are shown to do exactly the same changes. Timed: the sweep itself,
with the engine or connection already open and the tables already mapped or reflected, as in a
long-running service; building and copying the data is not timed.

The same comparison also runs on PostgreSQL (entry ``sweep-postgres``, server at
``FSWATCH_SYNC_BENCH_POSTGRES_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``):
the dataset is loaded once into a template database and every run gets a database created from
it; the floor's statements run through psycopg, spelled for PostgreSQL. Its targets are not
judged (the issue sets them on SQLite); it shows what changes when every query is a round trip.

The entries ``journal-bound`` and ``journal-bound-postgres`` ask what any journal of one row per
change must cost, on the backlog's data: 'floor b500' against itself writing, in the same
transaction, each changed row's id (``+ ids``) or its id and before-image built by the database
(``+ images``, the least a journal that can undo keeps) to a table with only a primary key.
fswatch_sync runs beside them: below the ``+ images`` ratio it could only go by doing the
rest of the floor's work for less than the floor does.

This module is also a library for other entries (the growth curve of issue 6):
:func:`build_dataset` and :func:`compare` take any :class:`Scale`.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import sqlalchemy as sa
from benchkit import Contestant, Options, Result, Target, entry, format_seconds
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fswatch_sync import db as fsdb
from fswatch_sync import load_settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

# The moment every sweep runs at: the data is generated relative to it.
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
NAIVE_NOW = NOW.replace(tzinfo=None)

# The default settings every contestant applies (SPEC's defaults).
RUNNING_TIMEOUT = timedelta(minutes=60)
PENDING_TIMEOUT = timedelta(minutes=60)
RETENTION = timedelta(days=30)
GRACE = timedelta(minutes=10)
MAX_DELETE_FRACTION = 0.5

ACTIVE = ("pending", "running")
TERMINAL = ("completed", "failed", "cancelled")
APPS_TABLE = "generated_applications"
TASKS_TABLE = "analysis_tasks"
ORPHAN_MESSAGE = "cancelled: its target app has no row any more"

SLUGS = (
    "openai_gpt-4",
    "openai_gpt-4o",
    "openai_gpt-4o-mini",
    "openai_o3-mini",
    "anthropic_claude-3-opus",
    "anthropic_claude-3.5-sonnet",
    "anthropic_claude-3.5-haiku",
    "google_gemini-1.5-pro",
    "google_gemini-2.0-flash",
    "meta-llama_llama-3.1-70b",
    "meta-llama_llama-3.1-405b",
    "mistralai_mistral-large",
    "mistralai_codestral",
    "deepseek_deepseek-chat",
    "deepseek_deepseek-coder",
    "qwen_qwen-2.5-72b",
    "qwen_qwen-2.5-coder-32b",
    "x-ai_grok-2",
    "cohere_command-r-plus",
    "microsoft_phi-4",
)

# The task mix (fractions of all tasks); what is left is terminal and within the retention.
# Two mixes: the steady state of an hourly sweep, which purges about one hour's worth of a
# 30-day retention window (1/720 of the terminal tasks; 0.2 % is rounded up), and the backlog
# that the very first sweep after installation meets (10 % of all tasks past the retention).
STEADY_OLD_TERMINAL = 0.002
BACKLOG_OLD_TERMINAL = 0.10
STUCK = 0.005  # running or pending for hours: failed / cancelled
ACTIVE_RECENT = 0.075  # pending or running, within the timeouts: kept (unless orphaned)
UNKNOWN_TARGET = 0.002  # tasks whose target app never had a row (left over from the seed)
YOUNG_APPS = 0.002  # app rows younger than the grace (all of them with a directory)


@dataclass(frozen=True)
class Scale:
    apps: int
    tasks: int
    missing_fraction: float = 0.10
    slugs: int = 20
    seed: int = 20260601
    old_terminal: float = STEADY_OLD_TERMINAL

    @property
    def label(self) -> str:
        return f"{self.apps}apps-{self.tasks}tasks-{self.old_terminal}old-{self.seed}"


FULL = Scale(apps=50_000, tasks=500_000)
QUICK = Scale(apps=2_000, tasks=20_000)
BACKLOG = Scale(apps=50_000, tasks=500_000, old_terminal=BACKLOG_OLD_TERMINAL)
QUICK_BACKLOG = Scale(apps=2_000, tasks=20_000, old_terminal=BACKLOG_OLD_TERMINAL)

COUNT_KEYS = ("orphan_apps", "orphan_tasks", "stuck_tasks", "old_tasks")


@dataclass
class Dataset:
    scale: Scale
    root: Path
    database: Path
    expected_counts: dict[str, int]
    expected_digest: str
    expected_summary: dict[str, int]
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    seconds: float
    counts: dict[str, int]
    cpu_seconds: float = 0.0
    # The longest write transaction (the time SQLite's write lock was held), where measured.
    longest_write: float | None = None


class _Clock:
    """Wall and CPU time of this process between start() and stop()."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _watch_write_transactions(engine: sa.Engine) -> list[float]:
    """Durations of the engine's write transactions, BEGIN to COMMIT/ROLLBACK (on SQLite, the
    time its write lock was held; on PostgreSQL, how long the batch's row locks were held)."""
    durations: list[float] = []
    opened: dict[int, float] = {}

    def _begin(conn: Any) -> None:
        if not fsdb.is_read_only(conn):
            opened[id(conn)] = time.perf_counter()

    def _end(conn: Any) -> None:
        started = opened.pop(id(conn), None)
        if started is not None:
            durations.append(time.perf_counter() - started)

    sa.event.listen(engine, "begin", _begin)
    sa.event.listen(engine, "commit", _end)
    sa.event.listen(engine, "rollback", _end)
    return durations


def _stamp(moment: datetime | None) -> str | None:
    """A naive UTC timestamp as SQLAlchemy's SQLite DateTime stores it."""
    return None if moment is None else f"{moment:%Y-%m-%d %H:%M:%S.%f}"


def _ago(rng: random.Random, low: timedelta, high: timedelta) -> datetime:
    span = (high - low).total_seconds()
    return NAIVE_NOW - low - timedelta(seconds=rng.uniform(0.0, span))


def _terminal_status(rng: random.Random) -> str:
    roll = rng.random()
    return "completed" if roll < 0.8 else ("failed" if roll < 0.95 else "cancelled")


def _error_for(status: str, rng: random.Random) -> str | None:
    if status == "failed":
        return f"analysis failed: tool exited with status {rng.choice((1, 2, 137))}"
    if status == "cancelled":
        return "cancelled by user"
    return None


TaskRow = tuple[str, str, int, str, datetime | None, datetime | None, datetime | None, str | None]


def _task(rng: random.Random, target: tuple[str, int], old_terminal: float) -> TaskRow:
    """One task: (task_id, model, app_number, status, created, started, completed, error)."""
    task_id = f"{rng.getrandbits(128):032x}"
    roll = rng.random()
    created: datetime | None
    started: datetime | None
    completed: datetime | None = None
    if roll < 1 - STUCK - ACTIVE_RECENT:
        old = roll < old_terminal
        status = _terminal_status(rng)
        completed = (
            _ago(rng, RETENTION + timedelta(days=1), timedelta(days=180))
            if old
            else _ago(rng, timedelta(0), RETENTION - timedelta(hours=12))
        )
        started = completed - timedelta(seconds=rng.uniform(5, 1200))
        created = started - timedelta(seconds=rng.uniform(0, 600))
        if status == "cancelled" and rng.random() < 0.5:
            started = None  # cancelled while pending
        return task_id, *target, status, created, started, completed, _error_for(status, rng)
    stuck = roll < 1 - ACTIVE_RECENT
    status = "running" if rng.random() < 0.4 else "pending"
    age = (
        _ago(rng, timedelta(hours=2), timedelta(hours=72))
        if stuck
        else _ago(rng, timedelta(0), timedelta(minutes=50))
    )
    if status == "running":
        started = age
        created = started - timedelta(seconds=rng.uniform(0, 600))
    else:
        created, started = age, None
    return task_id, *target, status, created, started, None, None


def _expected(
    apps: dict[tuple[str, int], datetime],
    present: set[tuple[str, int]],
    tasks: list[TaskRow],
) -> tuple[dict[str, int], str, dict[str, int]]:
    """The outcome of one correct sweep, computed from the generated rows alone."""
    young_after = NAIVE_NOW - GRACE
    kept = {key for key, created in apps.items() if key in present or created > young_after}
    removed = set(apps) - kept
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["orphan_apps"] = len(removed)
    statuses: list[tuple[int, str]] = []
    for pk, (_tid, model, number, status, created, started, completed, _err) in enumerate(
        tasks, start=1
    ):
        new = status
        if status in ACTIVE and (model, number) not in kept:
            new, counts["orphan_tasks"] = "cancelled", counts["orphan_tasks"] + 1
        elif (
            status == "running" and (started or created or NAIVE_NOW) < NAIVE_NOW - RUNNING_TIMEOUT
        ):
            new, counts["stuck_tasks"] = "failed", counts["stuck_tasks"] + 1
        elif status == "pending" and (created or NAIVE_NOW) < NAIVE_NOW - PENDING_TIMEOUT:
            new, counts["stuck_tasks"] = "cancelled", counts["stuck_tasks"] + 1
        elif status in TERMINAL and (completed or started or created or NAIVE_NOW) < (
            NAIVE_NOW - RETENTION
        ):
            counts["old_tasks"] += 1
            continue
        statuses.append((pk, new))
    digest = _digest(sorted(kept), statuses)
    summary = _summary(len(kept), (status for _pk, status in statuses), 0)
    return counts, digest, summary


def _digest(app_keys: Iterable[tuple[str, int]], statuses: Iterable[tuple[int, str]]) -> str:
    hasher = hashlib.sha256()
    for slug, number in app_keys:
        hasher.update(f"a|{slug}|{number}\n".encode())
    for pk, status in statuses:
        hasher.update(f"t|{pk}|{status}\n".encode())
    return hasher.hexdigest()


def _summary(
    apps: int, statuses: Iterable[str], terminal_without_completed_at: int
) -> dict[str, int]:
    by_status = Counter(statuses)
    return {
        "apps": apps,
        "tasks": sum(by_status.values()),
        **{f"tasks_{status}": by_status.get(status, 0) for status in (*ACTIVE, *TERMINAL)},
        "terminal_without_completed_at": terminal_without_completed_at,
    }


def outcome(url: str) -> tuple[str, dict[str, int]]:
    """Digest and summary of the host rows a run left behind."""
    connection = floor_connection(url)
    try:
        # Sorted here, not by the database: a server's collation may order slugs differently.
        keys = sorted(
            (str(slug), int(number))
            for slug, number in connection.execute(
                f"SELECT model_slug, app_number FROM {APPS_TABLE}"
            ).fetchall()
        )
        statuses = [
            (int(pk), str(status))
            for pk, status in connection.execute(
                f"SELECT id, status FROM {TASKS_TABLE} ORDER BY id"
            ).fetchall()
        ]
        marks = ",".join("?" * len(TERMINAL))
        unstamped = int(
            connection.execute(
                f"SELECT count(*) FROM {TASKS_TABLE}"
                f" WHERE status IN ({marks}) AND completed_at IS NULL",
                TERMINAL,
            ).fetchone()[0]
        )
    finally:
        connection.close()
    return _digest(keys, statuses), _summary(len(keys), (s for _pk, s in statuses), unstamped)


def build_dataset(scale: Scale, workdir: Path, log: Callable[[str], None]) -> Dataset:
    """Generate the rows and the tree once: a database file to copy and a tree to read."""
    started = time.perf_counter()
    rng = random.Random(scale.seed)
    slugs = list(SLUGS[: scale.slugs]) + [
        f"vendor_model-{i}" for i in range(len(SLUGS), scale.slugs)
    ]
    weights = [rng.uniform(0.5, 1.5) for _ in slugs]
    per_slug = Counter(rng.choices(range(len(slugs)), weights=weights, k=scale.apps))
    keys = [(slugs[i], n) for i in sorted(per_slug) for n in range(1, per_slug[i] + 1)]
    missing = {
        keys[i] for i in rng.sample(range(len(keys)), round(len(keys) * scale.missing_fraction))
    }
    apps: dict[tuple[str, int], datetime] = {}
    for key in keys:
        if key not in missing and rng.random() < YOUNG_APPS:
            apps[key] = _ago(rng, timedelta(0), GRACE - timedelta(minutes=2))
        else:
            apps[key] = _ago(rng, timedelta(hours=1), timedelta(days=180))
    present = set(keys) - missing

    tasks: list[TaskRow] = []
    for _ in range(scale.tasks):
        if rng.random() < UNKNOWN_TARGET:
            target = (rng.choice(slugs), 1_000_000 + rng.randrange(1000))
        else:
            target = keys[rng.randrange(len(keys))]
        tasks.append(_task(rng, target, scale.old_terminal))
    # Rows are inserted in creation order, as a live table grows.
    tasks.sort(key=lambda t: t[4] or NAIVE_NOW)
    app_order = sorted(apps, key=apps.__getitem__)

    directory = workdir / scale.label
    if directory.exists():
        shutil.rmtree(directory)
    root = directory / "apps"
    for slug, number in present:
        os.makedirs(root / slug / f"app{number}")
    database = directory / "base.db"
    engine = fsdb.create_engine(f"sqlite:///{database}")
    try:
        Store(engine).init_db()
    finally:
        engine.dispose()
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.executemany(
                f"INSERT INTO {APPS_TABLE} (id, model_slug, app_number, created_at)"
                " VALUES (?, ?, ?, ?)",
                ((pk, *key, _stamp(apps[key])) for pk, key in enumerate(app_order, start=1)),
            )
            connection.executemany(
                f"INSERT INTO {TASKS_TABLE} (id, task_id, target_model, target_app_number, status,"
                " created_at, started_at, completed_at, error_message)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (pk, tid, model, number, status, _stamp(c), _stamp(s), _stamp(d), err)
                    for pk, (tid, model, number, status, c, s, d, err) in enumerate(tasks, start=1)
                ),
            )
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)

    counts, digest, summary = _expected(apps, present, tasks)
    by_status = Counter(t[3] for t in tasks)
    sizes = {
        "apps": len(apps),
        "apps_without_dir": len(missing),
        "model_slugs": len(slugs),
        "tasks": len(tasks),
        "tasks_active": by_status["pending"] + by_status["running"],
        **{f"expect_{key}": value for key, value in counts.items()},
        "database_mib": round(database.stat().st_size / 2**20),
    }
    log(
        f"built {len(apps):,} apps ({len(missing):,} without directory), {len(tasks):,} tasks"
        f" in {time.perf_counter() - started:.1f} s"
    )
    return Dataset(scale, root, database, counts, digest, summary, sizes)


# -- contestant: fswatch_sync -------------------------------------------------------------------


def run_fswatch_sync(url: str, root: Path, batch_size: int | None = None) -> Run:
    flags: dict[str, Any] = {"root": str(root), "database_url": url}
    if batch_size is not None:
        flags["batch_size"] = batch_size
    settings = load_settings(flags, environ={})
    engine = fsdb.create_engine(settings.database_url)
    clock = _Clock()
    try:
        store = Store(engine, settings.schema, batch_size=settings.batch_size)
        store.host  # noqa: B018 - reflect once, as a running service already has
        sweeper = Sweeper(store, settings, instance_id="bench")
        writes = _watch_write_transactions(engine)
        clock.start()
        report = sweeper.run(now=NOW, trigger="bench")
        seconds, cpu = clock.stop()
    finally:
        engine.dispose()
    counts = {key: int(getattr(report, key)) for key in COUNT_KEYS}
    return Run(seconds, counts, cpu, max(writes, default=0.0))


# A batch of 5,000 rows per transaction: still bounded (a million-row purge is 200 short
# transactions), and the longest one is measured and shown next to the default's.
BIG_BATCH = 5000
# The floor's transactions: 500 rows each, the size the targets have always been stated against
# (fswatch_sync runs with its defaults: a first batch of Settings().batch_size, then sized to its
# time budget).
DEFAULT_BATCH = 500


def run_fswatch_sync_big_batch(url: str, root: Path) -> Run:
    return run_fswatch_sync(url, root, BIG_BATCH)


# -- contestant: the seed's algorithm ------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class SeedApp(_Base):
    __tablename__ = APPS_TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    model_slug: Mapped[str] = mapped_column(sa.String(200))
    app_number: Mapped[int]
    created_at: Mapped[datetime | None]


class SeedTask(_Base):
    __tablename__ = TASKS_TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[str] = mapped_column(sa.String(100))
    target_model: Mapped[str] = mapped_column(sa.String(200))
    target_app_number: Mapped[int]
    status: Mapped[str] = mapped_column(sa.String(20))
    created_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    error_message: Mapped[str | None] = mapped_column(sa.Text)


def seed_sweep(session: Session, root: Path, now: datetime) -> dict[str, int]:
    """The seed's hourly maintenance pass, as it was: the ORM, row by row, four passes."""
    counts = dict.fromkeys(COUNT_KEYS, 0)

    # 1. Orphan apps: every row loaded, every path checked. (The seed had no new-app grace; the
    # data holds no young row without a directory, so that makes no difference here.)
    for app in session.query(SeedApp).all():
        path = os.path.join(root, app.model_slug, f"app{app.app_number}")
        if not os.path.exists(path):
            session.delete(app)
            counts["orphan_apps"] += 1
    session.commit()

    # 2. Orphan tasks: one query per active task to find its app.
    for task in session.query(SeedTask).filter(SeedTask.status.in_(ACTIVE)).all():
        found = (
            session.query(SeedApp)
            .filter_by(model_slug=task.target_model, app_number=task.target_app_number)
            .first()
        )
        if found is None:
            task.status = "cancelled"
            task.completed_at = now
            task.error_message = ORPHAN_MESSAGE
            counts["orphan_tasks"] += 1
    session.commit()

    # 3. Stuck tasks.
    running_cutoff, pending_cutoff = now - RUNNING_TIMEOUT, now - PENDING_TIMEOUT
    stuck_running = session.query(SeedTask).filter(
        SeedTask.status == "running",
        sa.func.coalesce(SeedTask.started_at, SeedTask.created_at) < running_cutoff,
    )
    for task in stuck_running.all():
        task.status = "failed"
        task.completed_at = now
        task.error_message = "failed: still running after 60 minutes"
        counts["stuck_tasks"] += 1
    stuck_pending = session.query(SeedTask).filter(
        SeedTask.status == "pending", SeedTask.created_at < pending_cutoff
    )
    for task in stuck_pending.all():
        task.status = "cancelled"
        task.completed_at = now
        task.error_message = "cancelled: still pending after 60 minutes"
        counts["stuck_tasks"] += 1
    session.commit()

    # 4. Old tasks: every one loaded and deleted through the session.
    old = session.query(SeedTask).filter(
        SeedTask.status.in_(TERMINAL),
        sa.func.coalesce(SeedTask.completed_at, SeedTask.started_at, SeedTask.created_at)
        < now - RETENTION,
    )
    for task in old.all():
        session.delete(task)
        counts["old_tasks"] += 1
    session.commit()
    return counts


def run_seed(url: str, root: Path) -> Run:
    engine = sa.create_engine(url)
    try:
        with Session(engine) as session:
            session.connection()  # open the connection before the clock starts
            clock = _Clock()
            clock.start()
            counts = seed_sweep(session, root, NAIVE_NOW)
            seconds, cpu = clock.stop()
    finally:
        engine.dispose()
    return Run(seconds, counts, cpu)


# -- contestant: the floor ------------------------------------------------------------------------


class FloorConnection(Protocol):
    """What the floor needs of a driver connection in autocommit mode (sqlite3's shape)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...


class _PostgresFloorConnection:
    """The floor's statements, written for SQLite, on PostgreSQL through psycopg: only their
    spelling changes (placeholders, ``BEGIN IMMEDIATE``, the temporary schema's name)."""

    def __init__(self, url: str) -> None:
        import psycopg

        parts = sa.make_url(url)
        self.connection = psycopg.connect(
            host=parts.host or "127.0.0.1",
            port=parts.port or 5432,
            user=parts.username,
            password=parts.password,
            dbname=parts.database,
            autocommit=True,
        )

    @staticmethod
    def _spell(sql: str) -> Any:
        return (
            sql.replace("?", "%s").replace("BEGIN IMMEDIATE", "BEGIN").replace("temp.", "")
        )

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        return self.connection.execute(self._spell(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        with self.connection.cursor() as cursor:
            cursor.executemany(self._spell(sql), list(parameters))

    def close(self) -> None:
        self.connection.close()


def floor_connection(url: str) -> FloorConnection:
    """A driver connection, no SQLAlchemy in between: sqlite3 or psycopg, in autocommit mode."""
    if url.startswith("sqlite"):
        database = sa.make_url(url).database
        assert database is not None
        connection = sqlite3.connect(database, isolation_level=None)
        # As fswatch_sync's own connections: WAL syncs at checkpoints, not at every commit.
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection
    return _PostgresFloorConnection(url)


class _FloorCheckpoints:
    """On SQLite, the checkpoint policy fswatch_sync's sweep follows (fswatch_sync.wal): no
    checkpoint inside a commit, a PASSIVE one after every 25 commits and one at the end."""

    def __init__(self, connection: FloorConnection) -> None:
        self.connection = connection if isinstance(connection, sqlite3.Connection) else None
        self.commits = 0
        if self.connection is not None:
            self.connection.execute("PRAGMA wal_autocheckpoint = 0")

    def commit(self) -> None:
        if self.connection is None:
            return
        self.commits += 1
        if self.commits % 25 == 0:
            self.connection.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def end(self) -> None:
        if self.connection is None:
            return
        if self.commits % 25:
            self.connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.connection.execute("PRAGMA wal_autocheckpoint = 1000")


def _floor_orphans(
    connection: FloorConnection, root: Path, now: datetime
) -> list[tuple[str, int]]:
    """One ``os.scandir`` per model directory, one read of the app keys, the grace, the guard."""
    present: set[tuple[str, int]] = set()
    with os.scandir(root) as models:
        for model in models:
            if not model.is_dir(follow_symlinks=False):
                continue
            with os.scandir(model.path) as entries:
                for item in entries:
                    name = item.name
                    if (
                        name.startswith("app")
                        and name[3:].isdigit()
                        and item.is_dir(follow_symlinks=False)
                    ):
                        present.add((model.name, int(name[3:])))
    # The database judges the grace (NULL counts as old), as fswatch_sync lets it.
    rows = connection.execute(
        f"SELECT model_slug, app_number, CASE WHEN created_at > ? THEN 1 ELSE 0 END"
        f" FROM {APPS_TABLE}",
        (_stamp(now - GRACE),),
    ).fetchall()
    orphans = [
        (slug, number)
        for slug, number, young in rows
        if (slug, number) not in present and not young
    ]
    if len(orphans) > MAX_DELETE_FRACTION * len(rows):
        raise RuntimeError("the floor's guard refused")
    return orphans


def floor_sweep(connection: FloorConnection, root: Path, now: datetime) -> dict[str, int]:
    """One directory scan, then one set-based statement per change. No journal, no checks."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    orphans = _floor_orphans(connection, root, now)
    stamp = _stamp(now)
    active = ",".join("?" * len(ACTIVE))
    terminal = ",".join("?" * len(TERMINAL))

    connection.execute("BEGIN IMMEDIATE")
    connection.execute(
        "CREATE TEMP TABLE orphans (model_slug TEXT, app_number INTEGER,"
        " PRIMARY KEY (model_slug, app_number))"
    )
    connection.executemany("INSERT INTO temp.orphans VALUES (?, ?)", orphans)
    counts["orphan_apps"] = connection.execute(
        f"DELETE FROM {APPS_TABLE} WHERE (model_slug, app_number) IN"
        " (SELECT model_slug, app_number FROM temp.orphans)"
    ).rowcount
    connection.execute("DROP TABLE temp.orphans")
    connection.execute("COMMIT")

    connection.execute("BEGIN IMMEDIATE")
    counts["orphan_tasks"] = connection.execute(
        f"UPDATE {TASKS_TABLE} SET status = 'cancelled', completed_at = ?, error_message = ?"
        f" WHERE status IN ({active}) AND NOT EXISTS (SELECT 1 FROM {APPS_TABLE} a"
        f" WHERE a.model_slug = {TASKS_TABLE}.target_model"
        f" AND a.app_number = {TASKS_TABLE}.target_app_number)",
        (stamp, ORPHAN_MESSAGE, *ACTIVE),
    ).rowcount
    connection.execute("COMMIT")

    connection.execute("BEGIN IMMEDIATE")
    counts["stuck_tasks"] = connection.execute(
        f"UPDATE {TASKS_TABLE} SET status = 'failed', completed_at = ?, error_message = ?"
        " WHERE status = 'running' AND coalesce(started_at, created_at) < ?",
        (stamp, "failed: still running after 60 minutes", _stamp(now - RUNNING_TIMEOUT)),
    ).rowcount
    counts["stuck_tasks"] += connection.execute(
        f"UPDATE {TASKS_TABLE} SET status = 'cancelled', completed_at = ?, error_message = ?"
        " WHERE status = 'pending' AND created_at < ?",
        (stamp, "cancelled: still pending after 60 minutes", _stamp(now - PENDING_TIMEOUT)),
    ).rowcount
    connection.execute("COMMIT")

    connection.execute("BEGIN IMMEDIATE")
    counts["old_tasks"] = connection.execute(
        f"DELETE FROM {TASKS_TABLE} WHERE status IN ({terminal})"
        " AND coalesce(completed_at, started_at, created_at) < ?",
        (*TERMINAL, _stamp(now - RETENTION)),
    ).rowcount
    connection.execute("COMMIT")
    return counts


# What a journal of one row per change writes at least, in a table with nothing but a primary
# key (no time, no action, no second index): "ids", each changed row's id; "images", its id and
# its before-image (the row as JSON, built by the database), the least a journal that can undo
# the change must keep.
RECORD_TABLE = "bound_record"
Record = Literal["ids", "images"]
_COLUMNS = {APPS_TABLE: ("id", "model_slug", "app_number", "created_at")}


def _image(table: str, record: Record, alias: str) -> str:
    """The record's second column for a row of ``table`` named ``alias``."""
    if record == "ids":
        return "NULL"
    columns = _COLUMNS.get(table) or tuple(c.strip() for c in _TASK_COLUMNS.split(","))
    return "json_object(" + ", ".join(f"'{c}', {alias}.{c}" for c in columns) + ")"


def _change(
    connection: FloorConnection,
    head: str,
    head_arguments: Sequence[Any],
    where: str,
    where_arguments: Sequence[Any],
    *,
    table: str,
    record: Record | None,
) -> int:
    """``{head} WHERE {where}`` (an UPDATE or DELETE of ``table``), and with ``record`` each
    changed row recorded in RECORD_TABLE the cheapest way each backend has: on SQLite an
    ``INSERT ... SELECT`` of the same condition just before; on PostgreSQL one statement, a CTE
    over ``RETURNING`` (an UPDATE's before-images read in the same statement, as its snapshot
    sees them)."""
    statement = f"{head} WHERE {where}"
    arguments = [*head_arguments, *where_arguments]
    if record is None:
        return int(connection.execute(statement, arguments).rowcount)
    insert = f"INSERT INTO {RECORD_TABLE} (row_id, image)"
    if isinstance(connection, sqlite3.Connection):
        connection.execute(
            f"{insert} SELECT id, {_image(table, record, table)} FROM {table} WHERE {where}",
            where_arguments,
        )
        return int(connection.execute(statement, arguments).rowcount)
    image = "NULL" if record == "ids" else "row_to_json(before)::text"
    if head.startswith("DELETE"):
        image = image.replace("before", table)
        sql = (
            f"WITH changed AS ({statement} RETURNING id, {image} AS image)"
            f" {insert} SELECT id, image FROM changed"
        )
        return int(connection.execute(sql, arguments).rowcount)
    sql = (
        f"WITH old AS MATERIALIZED (SELECT id AS old_id, {image} AS old_image"
        f" FROM {table} before WHERE {where.replace(table + '.', 'before.')}),"
        f" changed AS ({head} FROM old WHERE id = old.old_id AND {where}"
        f" RETURNING id, old.old_image)"
        f" {insert} SELECT id, old_image FROM changed"
    )
    parameters = [*where_arguments, *head_arguments, *where_arguments]
    return int(connection.execute(sql, parameters).rowcount)


def batched_floor_sweep(
    connection: FloorConnection,
    root: Path,
    now: datetime,
    batch: int,
    *,
    record: Record | None = None,
) -> dict[str, int]:
    """The floor's statements cut into transactions of ``batch`` rows, as fswatch_sync's are.

    Still no journal, no lease, no Python per row: what bounded transactions alone cost. Each
    statement after the first read lists its ids and repeats its condition, as a re-check.
    ``record``: each changed row is also recorded in RECORD_TABLE, in the same transaction (the
    least a per-row journal costs; see the entry ``journal-bound``).
    """
    counts = dict.fromkeys(COUNT_KEYS, 0)
    orphans = _floor_orphans(connection, root, now)
    stamp = _stamp(now)
    active = ",".join("?" * len(ACTIVE))
    terminal = ",".join("?" * len(TERMINAL))

    checkpoints = _FloorCheckpoints(connection)
    for start in range(0, len(orphans), batch):
        part = orphans[start : start + batch]
        # One "slug = ? AND number IN (...)" term per model: answered from the (slug, number)
        # index, where a row-value IN list makes SQLite scan the table.
        by_slug: dict[str, list[int]] = {}
        for slug, number in part:
            by_slug.setdefault(slug, []).append(number)
        terms = " OR ".join(
            f"(model_slug = ? AND app_number IN ({','.join('?' * len(numbers))}))"
            for numbers in by_slug.values()
        )
        connection.execute("BEGIN IMMEDIATE")
        counts["orphan_apps"] += _change(
            connection,
            f"DELETE FROM {APPS_TABLE}",
            (),
            terms,
            [item for slug, numbers in by_slug.items() for item in (slug, *numbers)],
            table=APPS_TABLE,
            record=record,
        )
        connection.execute("COMMIT")
        checkpoints.commit()

    no_app = (
        f"NOT EXISTS (SELECT 1 FROM {APPS_TABLE} a WHERE a.model_slug = {TASKS_TABLE}.target_model"
        f" AND a.app_number = {TASKS_TABLE}.target_app_number)"
    )
    passes: list[tuple[str, str, tuple[Any, ...], str, str, str]] = [
        (
            "orphan_tasks",
            f"status IN ({active}) AND {no_app}",
            ACTIVE,
            "UPDATE",
            "cancelled",
            ORPHAN_MESSAGE,
        ),
        (
            "stuck_tasks",
            "status = 'running' AND coalesce(started_at, created_at) < ?",
            (_stamp(now - RUNNING_TIMEOUT),),
            "UPDATE",
            "failed",
            "failed: still running after 60 minutes",
        ),
        (
            "stuck_tasks",
            "status = 'pending' AND created_at < ?",
            (_stamp(now - PENDING_TIMEOUT),),
            "UPDATE",
            "cancelled",
            "cancelled: still pending after 60 minutes",
        ),
        (
            "old_tasks",
            f"status IN ({terminal}) AND coalesce(completed_at, started_at, created_at) < ?",
            (*TERMINAL, _stamp(now - RETENTION)),
            "DELETE",
            "",
            "",
        ),
    ]
    for counter, condition, params, verb, status, message in passes:
        ids = [
            pk
            for (pk,) in connection.execute(
                f"SELECT id FROM {TASKS_TABLE} WHERE {condition} ORDER BY id", params
            )
        ]
        for start in range(0, len(ids), batch):
            part = ids[start : start + batch]
            marks = ",".join("?" * len(part))
            connection.execute("BEGIN IMMEDIATE")
            if verb == "DELETE":
                head = f"DELETE FROM {TASKS_TABLE}"
                head_arguments: tuple[Any, ...] = ()
            else:
                head = f"UPDATE {TASKS_TABLE} SET status = ?, completed_at = ?, error_message = ?"
                head_arguments = (status, stamp, message)
            counts[counter] += _change(
                connection,
                head,
                head_arguments,
                f"id IN ({marks}) AND {condition}",
                (*part, *params),
                table=TASKS_TABLE,
                record=record,
            )
            connection.execute("COMMIT")
            checkpoints.commit()
    checkpoints.end()
    return counts


def run_batched_floor(url: str, root: Path, *, record: Record | None = None) -> Run:
    connection = floor_connection(url)
    try:
        if record is not None:
            key = "INTEGER" if isinstance(connection, sqlite3.Connection) else "BIGSERIAL"
            connection.execute(
                f"CREATE TABLE {RECORD_TABLE} (id {key} PRIMARY KEY, row_id BIGINT NOT NULL,"
                " image TEXT)"
            )
        clock = _Clock()
        clock.start()
        counts = batched_floor_sweep(connection, root, NAIVE_NOW, DEFAULT_BATCH, record=record)
        seconds, cpu = clock.stop()
        if record is not None:
            (recorded,) = connection.execute(
                f"SELECT count(*) FROM {RECORD_TABLE}"
                + (" WHERE image IS NOT NULL" if record == "images" else "")
            ).fetchone()
            changed = sum(counts.values())
            if recorded != changed:
                raise RuntimeError(f"{recorded} changes recorded, {changed} made")
    finally:
        connection.close()
    return Run(seconds, counts, cpu)


def run_floor_recording_ids(url: str, root: Path) -> Run:
    return run_batched_floor(url, root, record="ids")


def run_floor_recording_images(url: str, root: Path) -> Run:
    return run_batched_floor(url, root, record="images")


def run_floor(url: str, root: Path) -> Run:
    connection = floor_connection(url)
    try:
        clock = _Clock()
        clock.start()
        counts = floor_sweep(connection, root, NAIVE_NOW)
        seconds, cpu = clock.stop()
    finally:
        connection.close()
    return Run(seconds, counts, cpu)


# -- the comparison -------------------------------------------------------------------------------

FSWATCH_BIG = f"fswatch_sync b{BIG_BATCH}"
FSWATCH = ("fswatch_sync", FSWATCH_BIG)
FLOOR_BATCHED = f"floor b{DEFAULT_BATCH}"
FLOOR_IDS = f"floor b{DEFAULT_BATCH} + ids"
FLOOR_IMAGES = f"floor b{DEFAULT_BATCH} + images"

CONTESTANTS: dict[str, tuple[str, Callable[[str, Path], Run]]] = {
    "fswatch_sync": ("Sweeper.run, default settings, journal and lease included", run_fswatch_sync),
    FSWATCH_BIG: (
        f"the same with batch_size={BIG_BATCH} (fewer, longer transactions)",
        run_fswatch_sync_big_batch,
    ),
    "floor": ("one scandir per model dir + set-based SQL (sqlite3), no journal", run_floor),
    FLOOR_BATCHED: (
        f"the floor's statements in transactions of {DEFAULT_BATCH} rows, still no journal",
        run_batched_floor,
    ),
    FLOOR_IDS: (
        f"{FLOOR_BATCHED}, and each changed row's id written to a table with only a primary key,"
        " in the same transaction",
        run_floor_recording_ids,
    ),
    FLOOR_IMAGES: (
        f"{FLOOR_BATCHED}, and each changed row's id and before-image (JSON built by the"
        " database) written the same way: the least a journal that can undo adds",
        run_floor_recording_images,
    ),
    "seed": (
        "the seed's algorithm: ORM, os.path.exists per row, a query per active task",
        run_seed,
    ),
}


def _fresh_copy(base: Path, target: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(base, target)


class DatasetCopies(Protocol):
    """Where the contestants run: a fresh copy of the dataset's database for every run."""

    def fresh(self) -> str:
        """The SQLAlchemy URL of a new, untouched copy."""
        ...

    def dispose(self) -> None: ...


class SqliteCopies:
    """A copy of the dataset's SQLite file next to it."""

    def __init__(self, dataset: Dataset) -> None:
        self.base = dataset.database
        self.copy = dataset.database.with_name("run.db")

    def fresh(self) -> str:
        _fresh_copy(self.base, self.copy)
        return f"sqlite:///{self.copy}"

    def dispose(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.copy}{suffix}").unlink(missing_ok=True)


POSTGRES_ADMIN_URL = os.environ.get(
    "FSWATCH_SYNC_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
_PG_BASE, _PG_RUN = "fswatch_sync_bench_base", "fswatch_sync_bench_run"
_TASK_COLUMNS = (
    "id, task_id, target_model, target_app_number, status,"
    " created_at, started_at, completed_at, error_message"
)


class PostgresCopies:
    """The dataset loaded once into a template database (COPY from the SQLite file, then
    VACUUM ANALYZE); every run gets a new database created from that template."""

    def __init__(self, dataset: Dataset, admin_url: str, log: Callable[[str], None]) -> None:
        self.admin_url = admin_url
        started = time.perf_counter()
        self._admin(f"DROP DATABASE IF EXISTS {_PG_RUN}", f"DROP DATABASE IF EXISTS {_PG_BASE}",
                    f"CREATE DATABASE {_PG_BASE}")
        base_url = self._url(_PG_BASE)
        engine = fsdb.create_engine(base_url)
        try:
            Store(engine).init_db()
        finally:
            engine.dispose()
        source = sqlite3.connect(dataset.database)
        target = _PostgresFloorConnection(base_url)
        try:
            with target.connection.cursor() as cursor:
                for table, columns in (
                    (APPS_TABLE, "id, model_slug, app_number, created_at"),
                    (TASKS_TABLE, _TASK_COLUMNS),
                ):
                    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        for row in source.execute(f"SELECT {columns} FROM {table}"):
                            copy.write_row(row)
                    cursor.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" (SELECT max(id) FROM {table}))"
                    )
            target.execute("VACUUM ANALYZE")
        finally:
            source.close()
            target.close()
        log(f"loaded into PostgreSQL database {_PG_BASE} in {time.perf_counter() - started:.1f} s")

    def _url(self, database: str) -> str:
        return sa.make_url(self.admin_url).set(database=database).render_as_string(
            hide_password=False
        )

    def _admin(self, *statements: str) -> None:
        connection = _PostgresFloorConnection(self.admin_url)
        try:
            for statement in statements:
                connection.execute(statement)
        finally:
            connection.close()

    def fresh(self) -> str:
        self._admin(
            f"DROP DATABASE IF EXISTS {_PG_RUN}", f"CREATE DATABASE {_PG_RUN} TEMPLATE {_PG_BASE}"
        )
        return self._url(_PG_RUN)

    def dispose(self) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {_PG_RUN}", f"DROP DATABASE IF EXISTS {_PG_BASE}")


def postgres_unavailable(admin_url: str) -> str | None:
    """Why the PostgreSQL entry cannot run here, or None."""
    try:
        _PostgresFloorConnection(admin_url).close()
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    except Exception as exc:  # any failure to connect is the reason shown
        return f"cannot connect to {sa.make_url(admin_url)!s}: {str(exc).splitlines()[0]}"
    return None


# Every entry's contestants but journal-bound's own floors.
SWEEP_CONTESTANTS = tuple(c for c in CONTESTANTS if c not in (FLOOR_IDS, FLOOR_IMAGES))


def compare(
    scale: Scale,
    *,
    runs: int,
    workdir: Path,
    log: Callable[[str], None],
    name: str = "sweep",
    title: str = "",
    judged: bool = True,
    contestants: Iterable[str] = SWEEP_CONTESTANTS,
    postgres_url: str | None = None,
) -> Result:
    """Run every contestant ``runs`` times on copies of one dataset, interleaved, and verify.

    On SQLite by default; with ``postgres_url`` (a URL of a database to administer from), on
    PostgreSQL, the contestants unchanged but for their database URL."""
    dataset = build_dataset(scale, workdir, log)
    copies: DatasetCopies = (
        SqliteCopies(dataset)
        if postgres_url is None
        else PostgresCopies(dataset, postgres_url, log)
    )
    load_before = os.getloadavg()[0]
    chosen = list(contestants)
    result = Result(
        entry=name,
        title=title,
        sizes={**dataset.sizes, "runs_each": runs},
        contestants=[Contestant(c, description=CONTESTANTS[c][0]) for c in chosen],
    )
    counts_seen: dict[str, dict[str, int]] = {}
    cpu: dict[str, list[float]] = {c: [] for c in chosen}
    longest_write: dict[str, list[float]] = {c: [] for c in chosen}
    for round_number in range(runs):
        # Rotate the order each round so no contestant always runs on a warmer machine.
        shift = round_number % len(chosen)
        for contestant in chosen[shift:] + chosen[:shift]:
            url = copies.fresh()
            run = CONTESTANTS[contestant][1](url, dataset.root)
            digest, summary = outcome(url)
            result.contestant(contestant).samples.append(run.seconds)
            cpu[contestant].append(run.cpu_seconds)
            if run.longest_write is not None:
                longest_write[contestant].append(run.longest_write)
            log(
                f"round {round_number + 1}/{runs} {contestant}: {run.seconds:.3f} s"
                f" (cpu {run.cpu_seconds:.3f} s) {run.counts}"
            )
            if run.counts != dataset.expected_counts:
                result.ok = False
                result.notes.append(
                    f"{contestant} round {round_number + 1} counted {run.counts},"
                    f" expected {dataset.expected_counts}"
                )
            if digest != dataset.expected_digest:
                result.ok = False
                result.notes.append(
                    f"{contestant} round {round_number + 1} left different host rows:"
                    f" {summary} (expected {dataset.expected_summary})"
                )
            counts_seen[contestant] = run.counts
    copies.dispose()
    for ours in (c for c in FSWATCH if c in chosen):
        if "seed" in chosen:
            result.add_ratio("seed", ours, Target(">=", 20), judged=judged)
        if "floor" in chosen:
            result.add_ratio(ours, "floor", Target("<=", 1.5), judged=judged)
    if "fswatch_sync" in chosen and FLOOR_BATCHED in chosen:
        # No target: how much the tool itself (journal, compare-and-set, lease) adds to the
        # cost of bounded transactions.
        result.add_ratio("fswatch_sync", FLOOR_BATCHED, None, judged=False)
    for recording in (c for c in (FLOOR_IDS, FLOOR_IMAGES) if c in chosen):
        # The least a journal of one row per change can cost, against the same floor.
        if FLOOR_BATCHED in chosen:
            result.add_ratio(recording, FLOOR_BATCHED, None, judged=False)
        if "fswatch_sync" in chosen:
            result.add_ratio("fswatch_sync", recording, None, judged=False)
    cpu_median = {c: statistics.median(v) for c, v in cpu.items() if v}
    result.notes.append(
        "CPU time of the sweeping process (median; steadier than wall time on a shared machine): "
        + ", ".join(f"{c} {format_seconds(v)}" for c, v in cpu_median.items())
    )
    cpu_ratios = [
        f"{top}/{bottom} {cpu_median[top] / cpu_median[bottom]:.2f}x"
        for top, bottom in [("seed", c) for c in FSWATCH]
        + [(c, "floor") for c in FSWATCH]
        + [("fswatch_sync", FLOOR_BATCHED), (FLOOR_IDS, FLOOR_BATCHED)]
        + [(FLOOR_IMAGES, FLOOR_BATCHED)]
        if top in cpu_median and bottom in cpu_median and cpu_median[bottom] > 0
    ]
    if cpu_ratios:
        result.notes.append("CPU ratios: " + ", ".join(cpu_ratios))
    held = {c: max(v) for c, v in longest_write.items() if v}
    if held:
        result.notes.append(
            "longest write transaction (BEGIN to COMMIT: SQLite's write lock, PostgreSQL's row"
            " locks), worst run: "
            + ", ".join(f"{c} {format_seconds(v)}" for c, v in held.items())
        )
    load_after = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    result.notes.append(
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {cores} cores"
        + (" (other jobs were running: wall times are inflated)" if load_before > cores else "")
    )
    result.details = {
        "load_average": [load_before, load_after],
        "cpu_seconds": cpu,
        "longest_write_seconds": longest_write,
        "scale": scale.__dict__,
        "counts": counts_seen,
        "expected_counts": dataset.expected_counts,
        "expected_final_rows": dataset.expected_summary,
        "timed": "the sweep only; engine/connection open and tables mapped beforehand",
    }
    return result


@entry("sweep", "one full sweep on SQLite: fswatch_sync vs the seed's algorithm vs a floor")
def sweep(options: Options) -> Result:
    return compare(
        QUICK if options.quick else FULL,
        runs=options.runs,
        workdir=options.workdir,
        log=options.log,
        title="one hourly sweep on a SQLite file (steady state: an hour's worth of old tasks):"
        " fswatch_sync vs the seed's algorithm vs a floor",
        judged=not options.quick,
    )


@entry("sweep-backlog", "the first sweep after installation: 10 % of all tasks past retention")
def sweep_backlog(options: Options) -> Result:
    return compare(
        QUICK_BACKLOG if options.quick else BACKLOG,
        runs=options.runs,
        workdir=options.workdir,
        log=options.log,
        name="sweep-backlog",
        title="the first sweep on a SQLite file (a backlog: 10 % of all tasks past retention):"
        " fswatch_sync vs the seed's algorithm vs a floor",
        judged=False,
    )


@entry(
    "sweep-backlog-postgres",
    "the first sweep after installation on PostgreSQL: 10 % of all tasks past retention",
)
def sweep_backlog_postgres(options: Options) -> Result:
    return _on_postgres(
        options,
        QUICK_BACKLOG if options.quick else BACKLOG,
        name="sweep-backlog-postgres",
        title="the first sweep on PostgreSQL (a backlog: 10 % of all tasks past retention):"
        " fswatch_sync vs the seed's algorithm vs a floor",
    )


def _on_postgres(
    options: Options,
    scale: Scale,
    *,
    name: str,
    title: str,
    contestants: Iterable[str] = SWEEP_CONTESTANTS,
    postgres: bool = True,
) -> Result:
    """An entry's comparison on PostgreSQL (or, with ``postgres`` False, on SQLite)."""
    reason = postgres_unavailable(POSTGRES_ADMIN_URL) if postgres else None
    if reason is not None:
        skipped = Result(entry=name, title=title)
        skipped.notes.append(f"not run: {reason}")
        # Under CI the server is part of the machine: its absence is a failure, not a skip.
        skipped.ok = os.environ.get("CI") != "true"
        return skipped
    return compare(
        scale,
        runs=options.runs,
        workdir=options.workdir,
        log=options.log,
        name=name,
        title=title,
        judged=False,
        contestants=contestants,
        postgres_url=POSTGRES_ADMIN_URL if postgres else None,
    )


@entry(
    "sweep-postgres",
    "the same sweep on PostgreSQL: each of the seed's queries becomes a round trip",
)
def sweep_postgres(options: Options) -> Result:
    return _on_postgres(
        options,
        QUICK if options.quick else FULL,
        name="sweep-postgres",
        title="one hourly sweep on PostgreSQL (the steady-state data of `sweep`): fswatch_sync"
        " vs the seed's algorithm vs a floor",
    )


_BOUND_CONTESTANTS = ("fswatch_sync", FLOOR_BATCHED, FLOOR_IDS, FLOOR_IMAGES)


def _journal_bound(options: Options, *, name: str, where: str) -> Result:
    title = (
        f"the first sweep's backlog on {where}: the batched floor with and without the least"
        " per-row record of its changes (a row per change: its id; its id and before-image),"
        " beside fswatch_sync"
    )
    return _on_postgres(
        options,
        QUICK_BACKLOG if options.quick else BACKLOG,
        name=name,
        title=title,
        contestants=_BOUND_CONTESTANTS,
        postgres=where == "PostgreSQL",
    )


@entry(
    "journal-bound",
    "what the least per-row record of the changes adds to the batched floor (SQLite backlog)",
)
def journal_bound(options: Options) -> Result:
    return _journal_bound(options, name="journal-bound", where="SQLite")


@entry(
    "journal-bound-postgres",
    "what the least per-row record of the changes adds to the batched floor (PostgreSQL backlog)",
)
def journal_bound_postgres(options: Options) -> Result:
    return _journal_bound(options, name="journal-bound-postgres", where="PostgreSQL")
