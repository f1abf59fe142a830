"""Races (issue 5, item 3): a task runner and the tool, interleaved, on a real database.

Each example (drawn by hypothesis) builds a few apps — some with their directory, some without,
some of those to be *recreated* mid-run — and their tasks (``pending`` or ``running``, old enough
to count as stuck or not). Then three kinds of thread run at once, each on its own connections:

* the **runner** (one or two threads) plays the host's task runner: ``pending -> running ->
  completed | failed``, every step a compare-and-set ``UPDATE ... WHERE id = ? AND status = ?``
  in its own transaction, and logs which of its steps took effect;
* the **regenerator** (inside the runner's step list) recreates a removed app directory;
* the **tool** runs one to three operations: ``Store.remove_apps`` (the reactor's and sweep's one
  removal, with the re-check on disk), ``Sweeper.run`` (the full sweep: orphan apps, orphan,
  stuck and old tasks) and ``Store.apply_task_rule`` with an operator's cancel.

The interleaving is steered, not left to luck: every runner step waits for a *gate* — "after the
tool's k-th SQL statement" — and the tool, on passing a gate, gives the released step a moment to
be issued, so that runner writes land inside the tool's open transactions (between its locked
read and its write, just before its commit). Then the outcome is checked against three accounts
that must agree:

1. **Zero lost updates** — per task, the runner's successful steps and the journal's status changes
   form one chain from the seeded status to the final row (no two writers succeeded from the same
   status, nothing changed a task without saying so); a task the runner completed or failed is
   never overwritten to cancelled/failed by the tool.
2. **The journal is complete** — every change an operation returned is journalled, and vice versa.
3. **Delete-and-recreate** — an app whose directory was back when its removal re-checked the
   disk keeps its row; an app removed was absent at that re-check; an app never removed from the
   disk is never removed from the database; a removed app has no active task left.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from helpers import make_settings, wait_until
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from faults.harness import Run, scenario
from faults.kit import (
    ACTIVE,
    TASKS,
    TaskSeed,
    app_keys,
    clear_rows,
    insert_apps,
    insert_tasks,
    journal_rows,
    journal_task_pk,
    prepare_database,
    remove_tree,
    task_rows,
)
from faults.servers import scratch_database
from fswatch_sync import db, rules, signals
from fswatch_sync import sweep as sweep_module
from fswatch_sync.layout import AppKey
from fswatch_sync.settings import Settings
from fswatch_sync.store import RemovalOutcome, Store, TaskChange
from fswatch_sync.sweep import Sweeper

SLUG = "m"
GATE_WAIT_SECONDS = 10.0
GATES = 16  # gates 1..GATES; a step with gate 0 goes at once
_HOST_TABLES = ("analysis_tasks", "generated_applications")

# -- the plan of one example -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AppPlan:
    number: int
    on_disk: bool
    recreate_gate: int | None  # gone apps only: recreate the directory at this gate
    tasks: tuple[tuple[str, bool], ...]  # (initial status, old enough to be stuck)


@dataclasses.dataclass(frozen=True)
class Step:
    """One runner step: at ``gate``, move ``task`` (index into the flat task list) on, or
    recreate app ``app`` (index) when ``task`` is None."""

    gate: int
    task: int | None
    app: int | None = None
    outcome: str = "completed"  # the terminal status this task's runner aims for


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # "remove" | "sweep" | "change"
    apps: tuple[int, ...] = ()
    tasks: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    apps: tuple[AppPlan, ...]
    runners: tuple[tuple[Step, ...], ...]
    ops: tuple[Op, ...]
    pause_ms: int

    @property
    def flat_tasks(self) -> list[tuple[int, str, bool]]:
        """(app index, status, old) for every task, in seeding order."""
        return [(i, status, old) for i, app in enumerate(self.apps) for status, old in app.tasks]


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Apps and tasks; the runner's moves in a random interleaving (each task's own moves in
    order), released in that order a few per tool statement; the tool's operations."""
    count = draw(st.integers(1, 5))
    drafts = []
    for _number in range(1, count + 1):
        on_disk = draw(st.booleans())
        recreate = not on_disk and draw(st.booleans())
        tasks = tuple(
            draw(st.lists(st.tuples(st.sampled_from(ACTIVE), st.booleans()), max_size=4))
        )
        drafts.append((on_disk, recreate, tasks))
    flat = [(i, status) for i, draft in enumerate(drafts) for status, _old in draft[2]]
    # Moves: ("task", index, outcome) once per move, ("app", index) for a recreation.
    moves: list[tuple[str, int, str]] = []
    for index, (_app, status) in enumerate(flat):
        if draw(st.integers(0, 3)) == 0:
            continue  # the runner leaves this task alone
        outcome = draw(st.sampled_from(("completed", "failed")))
        moves += [("task", index, outcome)] * (2 if status == "pending" else 1)
    moves += [("app", index, "") for index, draft in enumerate(drafts) if draft[1]]
    moves = list(draw(st.permutations(moves)))
    # Release schedule: at gate 0 (at once) and after each of the tool's statements 1..GATES,
    # release the next few moves; moves left over go when the tool has finished.
    per_gate = draw(st.lists(st.integers(0, 2), min_size=GATES + 1, max_size=GATES + 1))
    gates = [gate for gate, n in enumerate(per_gate) for _ in range(n)]
    gates += [GATES + 1] * max(len(moves) - len(gates), 0)
    threads = draw(st.integers(1, 2))
    thread_of_task = {index: draw(st.integers(0, threads - 1)) for _k, index, _o in moves}
    runners: list[list[Step]] = [[] for _ in range(threads)]
    recreate_gate: dict[int, int] = {}
    for (kind, index, outcome), gate in zip(moves, gates, strict=False):
        if kind == "app":
            recreate_gate[index] = gate
            runners[thread_of_task.get(index, 0)].append(Step(gate, None, index))
        else:
            runners[thread_of_task[index]].append(Step(gate, index, None, outcome))
    apps = tuple(
        AppPlan(number, on_disk, recreate_gate.get(number - 1), tasks)
        for number, (on_disk, _recreate, tasks) in enumerate(drafts, start=1)
    )
    op_kinds = draw(st.lists(st.sampled_from(("remove", "sweep", "change")), min_size=1,
                             max_size=3))
    ops = []
    for kind in op_kinds:
        if kind == "remove":
            chosen = draw(st.sets(st.integers(0, count - 1), min_size=1))
            ops.append(Op("remove", apps=tuple(sorted(chosen))))
        elif kind == "change" and flat:
            chosen = draw(st.sets(st.integers(0, len(flat) - 1), min_size=1))
            ops.append(Op("change", tasks=tuple(sorted(chosen))))
        else:
            ops.append(Op("sweep"))
    runs = tuple(tuple(steps) for steps in runners)
    return Plan(apps, runs, tuple(ops), draw(st.sampled_from((2, 10, 40))))


# -- running one example ---------------------------------------------------------------------


@dataclasses.dataclass
class Gates:
    """Statement-count gates the tool opens as its SQL statements go by."""

    events: dict[int, threading.Event]
    done: dict[int, threading.Event]
    pause: float
    awaited: frozenset[int] = frozenset()  # gates some runner step waits for
    count: int = 0

    def passed_statement(self, statement: str) -> None:
        """Called after each of the tool's statements; only reads and writes of the host's
        tables count (not reflection, leases or bookkeeping), so gates land where races are."""
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        if verb not in ("SELECT", "UPDATE", "DELETE", "INSERT") or not any(
            table in statement for table in _HOST_TABLES
        ):
            return
        self.count += 1
        gate = self.events.get(self.count)
        if gate is None or gate.is_set():
            return
        gate.set()
        if self.count in self.awaited:
            # Let the released runner step run to its end inside the tool's open transaction;
            # if the tool's own lock holds it up, go on after the pause (it lands after commit).
            self.done[self.count].wait(self.pause)

    def open_all(self) -> None:
        for gate in self.events.values():
            gate.set()


@dataclasses.dataclass
class Log:
    runner: list[tuple[int, str, str, bool]] = dataclasses.field(default_factory=list)
    recreated: dict[AppKey, float] = dataclasses.field(default_factory=dict)
    checks: list[tuple[AppKey, bool, bool]] = dataclasses.field(default_factory=list)
    tool: list[TaskChange] = dataclasses.field(default_factory=list)
    removed: list[AppKey] = dataclasses.field(default_factory=list)
    # (operation, monotonic start, apps it removed)
    ops: list[tuple[str, float, list[AppKey]]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def runner_engine(url: str) -> Engine:
    """The task runner's own engine: autocommit-style single statements, waits for locks."""
    if url.startswith("sqlite"):
        return sa.create_engine(url, poolclass=NullPool, connect_args={"timeout": 60})
    # Pooled: PyMySQL spends ~50 ms building an SSL context for every new connection.
    return sa.create_engine(url, pool_size=1, pool_pre_ping=True)


def _cas(engine: Engine, pk: int, old: str, new: str) -> bool:
    """One compare-and-set step of the runner, retried while the database says "busy"."""
    now = db.to_db_time(db.utcnow())
    values: dict[str, Any] = {"status": new}
    if new == "running":
        values["started_at"] = now
    else:
        values["completed_at"] = now
        values["error_message"] = None if new == "completed" else "runner: analysis failed"

    def attempt() -> bool:
        with engine.begin() as connection:
            result = connection.execute(
                sa.update(TASKS).where(TASKS.c.id == pk, TASKS.c.status == old).values(values)
            )
            return bool(result.rowcount == 1)

    return db.retrying(60.0)(attempt)()


def run_runner(
    steps: tuple[Step, ...],
    plan: Plan,
    pks: list[int],
    root: Path,
    engine: Engine,
    gates: Gates,
    log: Log,
) -> None:
    state: dict[int, str] = {}
    try:
        for step in steps:
            if step.gate:
                gates.events[step.gate].wait(GATE_WAIT_SECONDS)
            try:
                run_step(step, plan, pks, root, engine, state, log)
            finally:
                if step.gate:
                    gates.done[step.gate].set()
    except Exception as exc:  # reported, never swallowed
        with log.lock:
            log.errors.append(f"runner: {type(exc).__name__}: {exc}")


def run_step(
    step: Step,
    plan: Plan,
    pks: list[int],
    root: Path,
    engine: Engine,
    state: dict[int, str],
    log: Log,
) -> None:
    """One runner step: recreate an app directory, or move one task on by compare-and-set."""
    if step.task is None:
        assert step.app is not None
        key = AppKey(SLUG, plan.apps[step.app].number)
        (root / SLUG / f"app{key.app_number}").mkdir(parents=True, exist_ok=True)
        with log.lock:
            log.recreated[key] = time.monotonic()
        return
    believed = state.get(step.task, plan.flat_tasks[step.task][1])
    if believed not in ACTIVE:
        return  # lost an earlier race for this task: a real runner drops it
    new = "running" if believed == "pending" else step.outcome
    took = _cas(engine, pks[step.task], believed, new)
    with log.lock:
        log.runner.append((pks[step.task], believed, new, took))
    state[step.task] = new if took else "lost"


@contextmanager
def recording_app_exists(log: Log) -> Iterator[Callable[[Path, list[AppKey]], set[AppKey]]]:
    """The re-check the tool makes under lock, recorded with what the regenerator had done.

    The sweep's re-check calls ``apps_present`` by its module-level name, so that name is
    replaced while the block runs; the recording function is yielded for
    :meth:`Store.remove_apps`.
    """
    names = vars(sweep_module)
    original = names["apps_present"]

    def recorded(root: Path, keys: list[AppKey]) -> set[AppKey]:
        with log.lock:
            back_before = {key: key in log.recreated for key in keys}
        present = set(original(root, keys))
        with log.lock:
            log.checks += [(key, key in present, back_before[key]) for key in keys]
        return present

    names["apps_present"] = recorded
    try:
        yield recorded
    finally:
        names["apps_present"] = original


def sweep_once(store: Store, settings: Settings) -> tuple[list[AppKey], list[TaskChange]]:
    """One full sweep; the apps it removed and every task change it announced."""
    changes: list[TaskChange] = []

    def collect(_sender: Any, change: TaskChange, **_extra: Any) -> None:
        changes.append(change)

    sweeper = Sweeper(store, settings, instance_id="race-sweeper")
    with signals.task_cancelled.connected_to(collect), signals.task_failed.connected_to(collect):
        report = sweeper.run(force=True, now=db.utcnow())
    return report.removed, changes


class Rig:
    """The engines of one property run, reused by every example: the probe (seeds and reads),
    two runner engines, and the tool's store, whose engine passes each statement to the gates
    of the example that is running."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.probe = runner_engine(url)
        self.runners = [runner_engine(url), runner_engine(url)]
        self.gates: Gates | None = None
        engine = db.create_engine(url)

        @event.listens_for(engine, "after_cursor_execute")
        def _after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if self.gates is not None:
                self.gates.passed_statement(statement)

        self.store = Store(engine, batch_size=2)
        self.store.host  # noqa: B018 - reflect the host tables now, not during a race

    def dispose(self) -> None:
        for engine in (self.probe, *self.runners, self.store.engine):
            engine.dispose()


def run_tool(plan: Plan, pks: list[int], root: Path, rig: Rig, gates: Gates, log: Log) -> None:
    store, url = rig.store, rig.url
    settings = make_settings(root, url, max_delete_fraction=1.0, batch_size=2)
    now = db.utcnow()
    try:
        with recording_app_exists(log) as exists:
            for op in plan.ops:
                started = time.monotonic()
                before = len(log.removed)
                if op.kind == "remove":
                    keys = [AppKey(SLUG, plan.apps[i].number) for i in op.apps]
                    outcome: RemovalOutcome = store.remove_apps(
                        keys,
                        source="reactor",
                        now=now,
                        present_now=lambda batch: exists(root, batch),
                    )
                    log.removed += outcome.removed
                    log.tool += outcome.cancelled
                elif op.kind == "sweep":
                    removed, changes = sweep_once(store, settings)
                    log.removed += removed
                    log.tool += changes
                else:
                    rule = rules.cancel_tasks_rule(
                        store.host, [pks[i] for i in op.tasks], "cancelled by an operator"
                    )
                    log.tool += store.apply_task_rule(
                        rule, source="operator", now=now, collect=True
                    ).changes
                log.ops.append((op.kind, started, log.removed[before:]))
    except Exception as exc:
        with log.lock:
            log.errors.append(f"tool: {type(exc).__name__}: {exc}")
    finally:
        gates.open_all()


def seed_example(plan: Plan, url: str, root: Path, probe: Engine) -> list[int]:
    clear_rows(probe)
    remove_tree(root)
    root.mkdir(parents=True)
    (root / "other" / "app1").mkdir(parents=True)  # the root is never empty
    now = db.utcnow()
    old, fresh = now - timedelta(hours=2), now - timedelta(minutes=1)
    rows: list[tuple[AppKey, datetime | None]] = []
    tasks: list[TaskSeed] = []
    for app in plan.apps:
        key = AppKey(SLUG, app.number)
        rows.append((key, old))
        if app.on_disk:
            (root / SLUG / f"app{app.number}" / "src").mkdir(parents=True)
        for status, is_old in app.tasks:
            created = old if is_old else fresh
            started = created if status == "running" else None
            tasks.append(TaskSeed(f"t{len(tasks)}", key, status, created, started))
    insert_apps(probe, rows)
    by_id = insert_tasks(probe, tasks)
    return [by_id[task.task_id] for task in tasks]


def run_example(plan: Plan, rig: Rig, root: Path) -> Log:
    probe = rig.probe
    pks = seed_example(plan, rig.url, root, probe)
    gates = Gates(
        {g: threading.Event() for g in range(1, GATES + 2)},
        {g: threading.Event() for g in range(1, GATES + 2)},
        plan.pause_ms / 1000,
        frozenset(step.gate for steps in plan.runners for step in steps),
    )
    log = Log()
    engines = rig.runners[: len(plan.runners)]
    threads = [
        threading.Thread(target=run_runner, args=(steps, plan, pks, root, e, gates, log),
                         name=f"runner-{i}")
        for i, (steps, e) in enumerate(zip(plan.runners, engines, strict=True))
    ]
    tool = threading.Thread(target=run_tool, args=(plan, pks, root, rig, gates, log),
                            name="tool")
    rig.gates = gates
    try:
        for thread in (*threads, tool):
            thread.start()
        for thread in (tool, *threads):
            thread.join(120)
            assert not thread.is_alive(), f"{thread.name} hung"
    finally:
        rig.gates = None
    assert not log.errors, log.errors
    check_example(plan, pks, root, probe, log)
    return log


# -- the invariants ----------------------------------------------------------------------------


def task_journal(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in journal if e["table_name"] == TASKS.name
            and e["action"] in ("task_cancelled", "task_failed")]


def check_task_chains(
    seeded: dict[int, str],
    runner: list[tuple[int, str, str, bool]],
    journal: list[dict[str, Any]],
    tasks: dict[int, dict[str, Any]],
) -> None:
    """Zero lost updates: per task, the runner's successful steps and the journal's changes
    form one chain from the seeded status to the row's final status."""
    transitions: dict[int, list[tuple[str, str, str]]] = {pk: [] for pk in seeded}
    runner_final: dict[int, str] = {}
    for pk, old, new, took in runner:
        if took:
            transitions[pk].append((old, new, "runner"))
            if new not in ACTIVE:
                runner_final[pk] = new
    for entry in task_journal(journal):
        transitions[journal_task_pk(entry)].append(
            (entry["old_status"], entry["new_status"], f"tool:{entry['source']}")
        )
    for pk, steps in transitions.items():
        final = tasks[pk]["status"]
        froms = [old for old, _new, _who in steps]
        assert len(froms) == len(set(froms)), (
            f"lost update on task {pk}: two writers changed it from the same status: {steps}"
        )
        status = seeded[pk]
        chain = {old: (new, who) for old, new, who in steps}
        walked = []
        while status in chain:
            new, who = chain.pop(status)
            walked.append((status, new, who))
            status = new
        assert not chain, f"task {pk}: changes that do not chain from {seeded[pk]}: {steps}"
        assert status == final, (
            f"task {pk}: seeded {seeded[pk]}, changes {walked} lead to {status}, row says {final}"
        )
    for pk, outcome in runner_final.items():
        assert tasks[pk]["status"] == outcome, (
            f"lost update: the runner {outcome} task {pk}, the row says {tasks[pk]['status']}"
        )


def check_example(plan: Plan, pks: list[int], root: Path, probe: Engine, log: Log) -> None:
    tasks = task_rows(probe)
    journal = journal_rows(probe)
    present = app_keys(probe)
    flat = plan.flat_tasks
    seeded = {pks[i]: status for i, (_app, status, _old) in enumerate(flat)}
    # 1. One chain per task from the seeded status to the final row.
    check_task_chains(seeded, log.runner, journal, tasks)
    task_entries = task_journal(journal)
    # 2. The journal and what the operations returned are the same set of changes.
    returned = sorted((c.pk, c.old_status, c.new_status) for c in log.tool)
    journalled = sorted(
        (journal_task_pk(e), e["old_status"], e["new_status"]) for e in task_entries
    )
    assert returned == journalled, f"returned {returned} != journalled {journalled}"
    removed_journal = sorted(
        AppKey(e["model_slug"], e["app_number"]) for e in journal if e["action"] == "app_removed"
    )
    assert sorted(log.removed) == removed_journal, (log.removed, removed_journal)
    # 3. Apps: removal only after an honest re-check; a directory back at re-check keeps its row.
    seeded_keys = {AppKey(SLUG, app.number) for app in plan.apps}
    assert present | set(log.removed) == seeded_keys and not (present & set(log.removed))
    for key, exists, back_before in log.checks:
        if back_before:
            assert exists, f"{key}: its directory was back before the re-check, which missed it"
    for kind, started, removed in log.ops:
        for key in removed:
            back = log.recreated.get(key)
            assert back is None or back > started, (
                f"{key}: its directory was back before the {kind} began, yet it was removed"
            )
    last_check: dict[AppKey, bool] = {}
    for key, exists, _back in log.checks:
        last_check[key] = exists
    for key in log.removed:
        assert last_check.get(key) is False, f"{key} removed without a re-check finding it absent"
    for app in plan.apps:
        key = AppKey(SLUG, app.number)
        if app.on_disk:
            assert key in present, f"{key} lost its row though its directory never left"
        elif app.recreate_gate is None and any(
            op.kind == "sweep" or (op.kind == "remove" and plan.apps.index(app) in op.apps)
            for op in plan.ops
        ):
            assert key not in present, f"{key}: absent, asked to be removed, still has its row"
    for pk, row in tasks.items():
        key = AppKey(row["target_model"], int(row["target_app_number"]))
        if key not in present:
            assert row["status"] not in ACTIVE, f"task {pk} of removed {key} is still {row}"
        if row["status"] == "cancelled" and key not in present:
            assert row["completed_at"] is not None


# -- hypothesis driver -----------------------------------------------------------------------


def run_property(
    url: str, workdir: Path, *, examples: int, fixed: bool, rng_seed: int, shrink: bool = True
) -> Counter[str]:
    """Run up to ``examples`` hypothesis examples; return counts of what happened in them
    (examples, runner moves and the ones it lost to the tool, tool changes, recreations and
    re-checks that found a recreated directory back). Raises on a counterexample (shrunk
    unless ``shrink`` is False)."""
    prepare_database(url)
    root = workdir / "generated" / "apps"
    seen: Counter[str] = Counter()
    rig = Rig(url)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=fixed,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if shrink else [])],
    )
    @given(plan=plans())
    def prop(plan: Plan) -> None:
        log = run_example(plan, rig, root)
        seen["examples"] += 1
        seen["runner moves"] += len(log.runner)
        seen["runner lost"] += sum(1 for *_rest, took in log.runner if not took)
        seen["tool changes"] += len(log.tool)
        seen["apps removed"] += len(log.removed)
        seen["recreated"] += len(log.recreated)
        seen["back at re-check"] += sum(1 for _k, exists, back in log.checks if exists and back)

    try:
        (prop if fixed else seed(rng_seed)(prop))()
    finally:
        rig.dispose()
    return seen


@scenario(
    "race-runner-vs-tool",
    backends=("sqlite", "postgres", "mysql"),
    quick=25,
    long=500,
    summary="hypothesis examples: a task runner (1-2 threads of compare-and-set steps) and a"
    " regenerator race remove_apps / Sweeper.run / an operator's cancel, runner steps gated"
    " inside the"
    " tool's open transactions; zero lost updates (runner log vs rows vs journal), journal ="
    " returned changes, a directory back at re-check keeps its row (quick rounds: fixed"
    " examples; long rounds: seeded)",
    timeout_s=3600,
)
def race_runner_vs_tool(run: Run) -> str:
    assert run.backend is not None
    with scratch_database(run.backend, run.workdir) as url:
        seen = run_property(url, run.workdir, examples=run.rounds, fixed=run.quick,
                            rng_seed=run.seed)
    how = "derandomized" if run.quick else f"seed {run.seed}"
    return (
        f"{seen['examples']} examples ({how}): {seen['runner moves']} runner moves"
        f" ({seen['runner lost']} lost to the tool), {seen['tool changes']} tool changes,"
        f" {seen['apps removed']} apps removed, {seen['recreated']} dirs recreated mid-run"
        f" ({seen['back at re-check']} re-checks found one back: row kept); no lost update,"
        " journal complete"
    )


# -- the same races through a running Service (the reactor) ----------------------------------


def free_runner(
    engine: Engine, pks: list[int], seeded: dict[int, str], rng: random.Random,
    stop: threading.Event, log: Log,
) -> None:
    """A task runner that keeps moving random tasks on until told to stop."""
    believed = dict(seeded)
    try:
        while not stop.is_set():
            live = [pk for pk in pks if believed[pk] in ACTIVE]
            if not live:
                return
            pk = rng.choice(live)
            old = believed[pk]
            new = "running" if old == "pending" else rng.choice(("completed", "failed"))
            took = _cas(engine, pk, old, new)
            with log.lock:
                log.runner.append((pk, old, new, took))
            believed[pk] = new if took else "lost"
            stop.wait(rng.uniform(0, 0.004))  # pacing, not waiting for an outcome
    except Exception as exc:
        with log.lock:
            log.errors.append(f"runner: {type(exc).__name__}: {exc}")


def reactor_round(url: str, workdir: Path, rng: random.Random, apps: int = 8) -> Counter[str]:
    """One running Service; each of ``apps`` app directories is ``rm -rf``'d once, most of them
    recreated after 0-30 ms, while a runner moves their tasks on. Then the same three accounts
    as the property: task chains, journal, and rows against the reactor's recorded re-checks."""
    from fswatch_sync import reactor as reactor_module
    from fswatch_sync.service import Service

    root = workdir / "generated" / "apps"
    remove_tree(root)
    keys = [AppKey(SLUG, n) for n in range(1, apps + 1)]
    sentinel, bystander = AppKey("n", 1), AppKey("n", 2)
    log = Log()
    seen: Counter[str] = Counter()
    runner = runner_engine(url)
    try:
        clear_rows(runner)
        old, fresh = db.utcnow() - timedelta(hours=2), db.utcnow() - timedelta(minutes=1)
        for key in (*keys, sentinel, bystander):
            (root / key.model_slug / f"app{key.app_number}" / "src").mkdir(parents=True)
        insert_apps(runner, [(key, old) for key in (*keys, sentinel, bystander)])
        seeds = [TaskSeed(f"{k.app_number}-{status}", k, status, fresh,
                          fresh if status == "running" else None)
                 for k in keys for status in ACTIVE]
        by_id = insert_tasks(runner, seeds)
        pks = [by_id[t.task_id] for t in seeds]
        seeded = {by_id[t.task_id]: t.status for t in seeds}
        names = vars(reactor_module)
        original = names["app_exists"]

        def recorded(root_: Path, key: AppKey) -> bool:
            with log.lock:
                back_before = key in log.recreated
            exists = bool(original(root_, key))
            with log.lock:
                log.checks.append((key, exists, back_before))
            return exists

        names["app_exists"] = recorded
        stop = threading.Event()
        service = Service(make_settings(root, url), instance_id="race-reactor",
                          initial_sweep=False)
        thread = threading.Thread(target=free_runner,
                                  args=(runner, pks, seeded, random.Random(rng.random()),
                                        stop, log), name="free-runner")
        try:
            service.start()
            thread.start()
            for key in rng.sample(keys, len(keys)):
                path = root / key.model_slug / f"app{key.app_number}"
                remove_tree(path)
                if rng.random() < 0.75:
                    delay = rng.choice((0.0, 0.0, 0.001, 0.002, 0.005, 0.01, 0.03))
                    if delay:
                        stop.wait(delay)  # the regenerator's timing
                    path.mkdir()
                    with log.lock:
                        log.recreated[key] = time.monotonic()
                stop.wait(rng.uniform(0, 0.02))
            remove_tree(root / sentinel.model_slug / f"app{sentinel.app_number}")
            wait_until(lambda: sentinel not in app_keys(runner), timeout=60,
                       what="the sentinel's removal (every earlier event applied)")
            wait_until(lambda: service.reactor.pending() == 0, what="the reactor's queue empty")
            stats = service.status_stats()
        finally:
            stop.set()
            thread.join(30)
            service.stop()
            names["app_exists"] = original
        assert not log.errors, log.errors
        assert stats.get("errors", 0) == 0, stats
        tasks = task_rows(runner)
        journal = journal_rows(runner)
        present = app_keys(runner)
    finally:
        runner.dispose()
    check_task_chains(seeded, log.runner, journal, tasks)
    removed = {AppKey(e["model_slug"], e["app_number"])
               for e in journal if e["action"] == "app_removed"}
    assert removed == {*keys, sentinel, bystander} - present, (removed, present)
    assert bystander in present, "an app nobody touched lost its row"
    for key, exists, back_before in log.checks:
        if back_before:
            assert exists, f"{key}: its directory was back before the re-check, which missed it"
    for key in keys:
        checks = [exists for k, exists, _b in log.checks if k == key]
        if key in removed:
            assert False in checks, f"{key} removed without a re-check finding it absent"
        elif key not in log.recreated:
            raise AssertionError(f"{key}: removed from disk, never back, still has its row")
    for pk, row in tasks.items():
        if AppKey(row["target_model"], int(row["target_app_number"])) in removed:
            assert row["status"] not in ACTIVE, f"task {pk} of a removed app is {row['status']}"
    seen["deletions"] += len(keys)
    seen["recreated"] += len(log.recreated)
    seen["kept"] += sum(1 for key in log.recreated if key in present)
    seen["runner moves"] += len(log.runner)
    seen["runner lost"] += sum(1 for *_rest, took in log.runner if not took)
    return seen


@scenario(
    "race-reactor-recreate",
    backends=("sqlite", "postgres", "mysql"),
    quick=2,
    long=60,
    summary="a running Service while app dirs are rm -rf'd and most recreated 0-30 ms later,"
    " and a task runner moves their tasks on: rows kept when the reactor's re-check found the"
    " directory back, removed otherwise (never without an absent re-check), no lost update,"
    " journal = removals, an untouched app keeps its row",
    timeout_s=1800,
)
def race_reactor_recreate(run: Run) -> str:
    assert run.backend is not None
    rng = run.rng()
    seen: Counter[str] = Counter()
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for _ in range(run.rounds):
            seen += reactor_round(url, run.workdir, rng)
    return (
        f"{run.rounds} service runs: {seen['deletions']} rm -rf, {seen['recreated']} recreated"
        f" ({seen['kept']} kept their row: back at the re-check), {seen['runner moves']} runner"
        f" moves ({seen['runner lost']} lost to the reactor); no lost update"
    )


__all__ = ["Plan", "plans", "run_example", "run_property"]
