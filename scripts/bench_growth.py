"""Issue 6's growth figures: how the sweep's cost and the event latency grow with the work.

Two entries:

* **sweep-growth** — the sweep comparison of ``bench_sweep`` (fswatch_sync, the seed's
  algorithm, the floor, and the two batching variants that separate the floor's costs from the
  tool's) at 10,000, 50,000 and 200,000 apps with ten tasks per app, the same steady-state task
  mix at every scale. Each scale is :func:`bench_sweep.compare` on its own generated dataset and
  every run's outcome is verified the same way. The 200,000-app point (2 million tasks, a
  ~500 MB SQLite file, the seed needing about a minute) runs once, whatever ``--runs`` says.
* **latency-load** — the ``rm -rf`` latency of ``bench_events.latency`` (clock from the rmdir of
  the app directory to the first poll of a separate connection that sees the row gone and no
  active task), measured in alternating blocks on an idle system and under a steady background
  load: a separate process running a task runner (short write transactions on the tasks table at
  a fixed rate: a new pending task, pending → running, running → completed) and a deleter
  (``rm -rf`` of other app directories at a fixed rate, each of which the daemon must handle
  too). Idle and loaded blocks alternate in one daemon's lifetime, so both see the same machine.
  Before an idle block the load is paused and the daemon's backlog drained.

Run this file directly (``python scripts/bench_growth.py load ...``) only as latency-load's
background process: it reads ``on`` / ``off`` / ``stop`` lines on stdin and answers each on
stdout (the last answer is a JSON line of what it did).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from benchkit import Contestant, Options, Result, entry

# -- sweep-growth -------------------------------------------------------------------------------

# Steady state at every scale (the `sweep` entry's mix); the largest point runs once.
GROWTH_FULL = ((10_000, None), (50_000, None), (200_000, 1))
GROWTH_QUICK = ((500, 1), (1_000, 1), (2_000, 1))  # a smoke test: one run each
TASKS_PER_APP = 10
# The contestants drawn as the growth curve (the others are in the JSON and the table).
GROWTH_MAIN = ("fswatch_sync", "seed", "floor")


def _short(apps: int) -> str:
    return f"{apps // 1000}k" if apps >= 1000 and apps % 1000 == 0 else str(apps)


@entry("sweep-growth", "the sweep at 10k, 50k and 200k apps (tasks x10): how each cost grows")
def sweep_growth(options: Options) -> Result:
    import bench_sweep

    points = GROWTH_QUICK if options.quick else GROWTH_FULL
    result = Result(
        entry="sweep-growth",
        title="one hourly sweep (steady state) on SQLite at "
        + ", ".join(f"{apps:,}" for apps, _ in points)
        + f" apps ({TASKS_PER_APP} tasks each): fswatch_sync vs the seed's algorithm vs a floor",
    )
    growth: list[dict[str, Any]] = []
    for apps, runs_cap in points:
        scale = bench_sweep.Scale(apps=apps, tasks=apps * TASKS_PER_APP)
        runs = min(options.runs, runs_cap) if runs_cap else options.runs
        options.log(f"sweep-growth: {apps:,} apps, {scale.tasks:,} tasks, {runs} run(s) each")
        workdir = options.workdir / f"scale-{apps}"
        workdir.mkdir()
        try:
            point = bench_sweep.compare(
                scale,
                runs=runs,
                workdir=workdir,
                log=options.log,
                name="sweep-growth",
                judged=False,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        suffix = f" @{_short(apps)}"
        for contestant in point.contestants:
            result.contestants.append(
                Contestant(
                    contestant.name + suffix,
                    samples=list(contestant.samples),
                    unit=contestant.unit,
                    description=f"{contestant.description} ({apps:,} apps, {scale.tasks:,} tasks)",
                )
            )
        result.add_ratio("seed" + suffix, "fswatch_sync" + suffix, None, judged=False)
        result.add_ratio("fswatch_sync" + suffix, "floor" + suffix, None, judged=False)
        result.add_ratio("seed" + suffix, "floor" + suffix, None, judged=False)
        if not point.ok:
            result.ok = False
            result.notes += [f"{apps:,} apps: {note}" for note in point.notes if "expected" in note]
        cpu = point.details["cpu_seconds"]
        growth.append(
            {
                "apps": apps,
                "tasks": scale.tasks,
                "runs": runs,
                "sizes": point.sizes,
                "medians": {c.name: c.median for c in point.contestants},
                "samples": {c.name: c.samples for c in point.contestants},
                "cpu_median": {
                    name: statistics.median(values) for name, values in cpu.items() if values
                },
                "longest_write_seconds": point.details["longest_write_seconds"],
                "load_average": point.details["load_average"],
                "ok": point.ok,
            }
        )
    result.sizes = {
        "scales": " / ".join(f"{apps:,}" for apps, _ in points),
        "tasks_per_app": TASKS_PER_APP,
        "runs_each": options.runs,
    }
    capped = [f"{apps:,}" for apps, cap in points if cap and cap < options.runs]
    if capped and not options.quick:
        result.notes.append(
            f"the {', '.join(capped)}-app point ran once per contestant (not {options.runs}):"
            " its seed run alone takes about a minute and each run copies a ~500 MB file"
        )
    result.notes.append(
        "per-app cost (median seconds / apps): "
        + "; ".join(
            f"{point['apps']:,}: "
            + ", ".join(
                f"{name} {point['medians'][name] / point['apps'] * 1e6:.0f} us"
                for name in GROWTH_MAIN
            )
            for point in growth
        )
    )
    result.details = {"growth": growth, "main": list(GROWTH_MAIN)}
    return result


# -- latency-load: the background process --------------------------------------------------------


class _Paced:
    """Calls ``action`` every ``period`` seconds while ``running`` is set; never catches up in a
    burst after a stall (a late tick is taken now and the schedule restarts from it)."""

    def __init__(
        self, period: float, action: Callable[[], bool], running: threading.Event,
        stop: threading.Event,
    ) -> None:
        self.period, self.action, self.running, self.stop = period, action, running, stop
        self.lock = threading.Lock()  # held while an action runs
        self.done = 0
        self.active_seconds = 0.0
        self.exhausted = False
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        due = time.perf_counter()
        while not self.stop.is_set():
            if not self.running.is_set():
                self.running.wait(0.05)
                due = time.perf_counter()
                continue
            wait = due - time.perf_counter()
            if wait > 0:
                self.stop.wait(wait)
                continue
            with self.lock:
                if not self.running.is_set() or self.exhausted:
                    continue
                started = time.perf_counter()
                if self.action():
                    self.done += 1
                else:
                    self.exhausted = True
                self.active_seconds += time.perf_counter() - started
            due += self.period
            now = time.perf_counter()
            if due < now - self.period:
                due = now


class _Runner:
    """A task runner's writes: each one short write transaction on the tasks table."""

    def __init__(self, database: Path, bystanders: list[tuple[str, int]]) -> None:
        self.connection = sqlite3.connect(database, isolation_level=None, timeout=30,
                                          check_same_thread=False)
        self.bystanders = bystanders
        self.rng = random.Random(6)
        self.pending: deque[int] = deque()
        self.running: deque[int] = deque()
        self.step = 0
        self.seconds: list[float] = []  # each write transaction, BEGIN IMMEDIATE to COMMIT
        self.errors: list[str] = []

    def _now(self) -> str:
        return datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")

    def write(self) -> bool:
        self.step += 1
        started = time.perf_counter()
        try:
            self.connection.execute("BEGIN IMMEDIATE")
            if self.step % 3 == 1 or not (self.pending or self.running):
                model, number = self.rng.choice(self.bystanders)
                cursor = self.connection.execute(
                    "INSERT INTO analysis_tasks (task_id, target_model, target_app_number,"
                    " status, created_at) VALUES (?, ?, ?, 'pending', ?)",
                    (f"runner-{os.getpid()}-{self.step}", model, number, self._now()),
                )
                assert cursor.lastrowid is not None
                self.pending.append(cursor.lastrowid)
            elif self.step % 3 == 2 and self.pending:
                task = self.pending.popleft()
                self.connection.execute(
                    "UPDATE analysis_tasks SET status = 'running', started_at = ?"
                    " WHERE id = ? AND status = 'pending'",
                    (self._now(), task),
                )
                self.running.append(task)
            else:
                queue = self.running or self.pending
                task = queue.popleft()
                self.connection.execute(
                    "UPDATE analysis_tasks SET status = 'completed', completed_at = ?"
                    " WHERE id = ? AND status IN ('pending', 'running')",
                    (self._now(), task),
                )
            self.connection.execute("COMMIT")
        except sqlite3.Error as error:
            self.errors.append(str(error))
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
        self.seconds.append(time.perf_counter() - started)
        return True


class _Deleter:
    """``rm -rf`` of the next victim app directory."""

    def __init__(self, root: Path, victims: list[tuple[str, int]]) -> None:
        self.root = root
        self.victims = deque(victims)
        self.deleted: list[tuple[str, int]] = []

    def delete(self) -> bool:
        if not self.victims:
            return False
        model, number = self.victims.popleft()
        shutil.rmtree(self.root / model / f"app{number}")
        self.deleted.append((model, number))
        return True


def _keys(pairs: Sequence[Sequence[Any]]) -> list[tuple[str, int]]:
    return [(str(model), int(number)) for model, number in pairs]


def load_main(argv: Sequence[str]) -> int:
    """The background process: ``on`` / ``off`` / ``stop`` on stdin, one answer line each."""
    parser = argparse.ArgumentParser(prog="bench_growth.py load")
    parser.add_argument("--database", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--plan", type=Path, required=True, help="JSON: victims, bystanders")
    parser.add_argument("--writes-per-second", type=float, required=True)
    parser.add_argument("--deletions-per-second", type=float, required=True)
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text(encoding="utf-8"))
    runner = _Runner(args.database, _keys(plan["bystanders"]))
    deleter = _Deleter(args.root, _keys(plan["victims"]))
    running, stop = threading.Event(), threading.Event()
    workers = [
        _Paced(1 / args.writes_per_second, runner.write, running, stop),
        _Paced(1 / args.deletions_per_second, deleter.delete, running, stop),
    ]
    for worker in workers:
        worker.thread.start()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        command = line.strip()
        if command == "on":
            running.set()
            out.write("on\n")
        elif command == "off":
            running.clear()
            for worker in workers:
                with worker.lock:  # wait for the action in flight
                    pass
            out.write(json.dumps({"deleted": deleter.deleted}) + "\n")
        elif command == "stop":
            break
        out.flush()
    running.clear()
    stop.set()
    for worker in workers:
        worker.thread.join(5)
    out.write(json.dumps({
        "writes": workers[0].done,
        "writes_active_seconds": workers[0].active_seconds,
        "write_seconds": runner.seconds,
        "write_errors": runner.errors,
        "deleted": deleter.deleted,
        "deletions_exhausted": workers[1].exhausted,
    }) + "\n")
    out.flush()
    runner.connection.close()
    return 0


# -- latency-load: the entry ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSize:
    models: int
    samples: int  # rm -rf samples in each condition
    block: int  # samples per block; idle and loaded blocks alternate
    victims: int  # app directories the background deleter may remove
    bystanders: int  # apps the task runner writes tasks for (never removed)
    writes_per_second: float = 50.0
    deletions_per_second: float = 4.0
    warm_up_seconds: float = 0.5  # load running before a loaded block's first sample
    files_per_app: int = 10


LOAD_FULL = LoadSize(models=4, samples=200, block=25, victims=300, bystanders=40)
LOAD_QUICK = LoadSize(models=2, samples=12, block=6, victims=60, bystanders=10,
                      warm_up_seconds=0.2)
IDLE, LOADED = "rm -rf, idle", "rm -rf, under load"


class _LoadProcess:
    """The background process, driven line by line."""

    def __init__(self, database: Path, root: Path, plan: Path, size: LoadSize) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "load", "--database", str(database), "--root", str(root),
             "--plan", str(plan), "--writes-per-second", str(size.writes_per_second),
             "--deletions-per-second", str(size.deletions_per_second)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._expect("ready")

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        return self.process.stdin, self.process.stdout

    def _expect(self, word: str) -> str:
        line = self._pipes()[1].readline()
        if not line:
            raise RuntimeError(f"the load process exited ({self.process.wait()})")
        if word and line.strip() != word:
            raise RuntimeError(f"the load process said {line.strip()!r}, expected {word!r}")
        return line

    def send(self, command: str) -> str:
        stdin, _ = self._pipes()
        stdin.write(command + "\n")
        stdin.flush()
        return self._expect("" if command != "on" else "on")

    def finish(self) -> dict[str, Any]:
        try:
            report: dict[str, Any] = json.loads(self.send("stop"))
        finally:
            if self.process.stdin:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return report


def _all_handled(
    connection: sqlite3.Connection, keys: Sequence[tuple[str, int]], timeout: float
) -> bool:
    """Every one of ``keys`` has no row and no active task (waiting up to ``timeout``)."""
    from bench_events import poll_until

    def done() -> bool:
        for model, number in keys:
            row = connection.execute(
                "SELECT (SELECT count(*) FROM generated_applications WHERE model_slug = ?1"
                " AND app_number = ?2) + (SELECT count(*) FROM analysis_tasks WHERE"
                " target_model = ?1 AND target_app_number = ?2"
                " AND status IN ('pending', 'running'))",
                (model, number),
            ).fetchone()
            if row[0]:
                return False
        return True

    return poll_until(done, timeout=timeout, interval=0.005) is not None


@entry("latency-load", "rm -rf latency under a steady background of deletions and task-runner"
       " writes, vs idle")
def latency_load(options: Options) -> Result:
    from bench_events import (
        PACE_SECONDS,
        _one_sample,
        load_average,
        make_app,
        note_load,
        note_problems,
        percentile,
        reader,
        remove_tree,
        running_daemon,
        seed_database,
        slug,
    )

    from fswatch_sync.layout import AppKey

    size = LOAD_QUICK if options.quick else LOAD_FULL
    base = options.workdir / "latency-load"
    root, outside, database = base / "apps", base / "moved-away", base / "app.db"
    per_model = -(-(2 * size.samples + size.victims + size.bystanders) // size.models) + 1
    keys = [AppKey(slug(m), n) for n in range(per_model) for m in range(size.models)]
    samples = keys[: 2 * size.samples]
    victims = keys[2 * size.samples : 2 * size.samples + size.victims]
    bystanders = keys[len(keys) - size.bystanders :]
    result = Result(
        entry="latency-load",
        title="rm -rf of one app dir → row gone and tasks cancelled, idle vs under a background"
        f" of {size.deletions_per_second:g} app deletions/s and {size.writes_per_second:g}"
        " task-runner writes/s (daemon, SQLite file)",
        contestants=[
            Contestant(IDLE, description="fswatch_sync daemon, nothing else writing"),
            Contestant(LOADED, description="fswatch_sync daemon while a separate process"
                       f" rm -rf's {size.deletions_per_second:g} other app dirs/s and commits"
                       f" {size.writes_per_second:g} task writes/s"),
        ],
    )
    load = load_average()
    emptying: dict[str, list[float]] = {IDLE: [], LOADED: []}
    report: dict[str, Any] = {}
    order: list[str] = []
    loaded_time = 0.0
    try:
        outside.mkdir(parents=True)
        for key in keys:
            make_app(root / key.model_slug / f"app{key.app_number}", files=size.files_per_app,
                     subdirs=("src/components", "public"))
        seeded = seed_database(database, keys)
        plan = base / "plan.json"
        plan.write_text(json.dumps({
            "victims": [[k.model_slug, k.app_number] for k in victims],
            "bystanders": [[k.model_slug, k.app_number] for k in bystanders],
        }), encoding="utf-8")
        result.sizes = {
            "model_dirs": size.models, **seeded, "files_per_app": size.files_per_app,
            "samples_each": size.samples, "block": size.block,
            "deletions_per_second": size.deletions_per_second,
            "writes_per_second": size.writes_per_second,
        }
        blocks = -(-size.samples // size.block)
        order = [c for _ in range(blocks) for c in (IDLE, LOADED)]
        options.log(f"latency-load: {2 * size.samples} samples in {len(order)} blocks on"
                    f" {len(keys)} apps")
        with running_daemon(root, database, options.workdir / "daemon.log") as daemon:
            connection = reader(database)
            background = _LoadProcess(database, root, plan, size)
            try:
                pending = iter(samples)
                for number, condition in enumerate(order, start=1):
                    if condition == LOADED:
                        background.send("on")
                        switched_on = time.perf_counter()
                        time.sleep(size.warm_up_seconds)
                    for _ in range(size.block):
                        if len(result.contestant(condition).samples) >= size.samples:
                            break
                        key = next(pending)
                        seconds, took, verdict = _one_sample(connection, root, outside,
                                                             "rm -rf", key)
                        result.contestant(condition).samples.append(seconds)
                        emptying[condition].append(took)
                        if verdict:
                            result.ok = False
                            result.notes.append(f"{condition}: {key}: {verdict}")
                        time.sleep(PACE_SECONDS)
                    if condition == LOADED:
                        # Pause, then let the daemon drain what the background removed.
                        deleted = json.loads(background.send("off"))["deleted"]
                        loaded_time += time.perf_counter() - switched_on
                        if not _all_handled(connection, deleted, timeout=10.0):
                            result.ok = False
                            result.notes.append(f"block {number}: background deletions not"
                                                " all handled within 10 s")
                        time.sleep(0.2)
                    median = statistics.median(result.contestant(condition).samples)
                    options.log(f"latency-load: block {number}/{len(order)} ({condition}),"
                                f" median so far {median * 1000:.1f} ms")
            finally:
                report = background.finish()
                connection.close()
            result.details["daemon_ready_seconds"] = daemon.ready_seconds
        note_problems(result, daemon.problems())
        check = reader(database)
        try:
            if not _all_handled(check, _keys(report["deleted"]), timeout=10.0):
                result.ok = False
                result.notes.append("some background deletions were never handled")
        finally:
            check.close()
    finally:
        remove_tree(base)

    judged = not options.quick
    percentiles: dict[str, dict[str, float]] = {}
    for condition in (IDLE, LOADED):
        values = [s for s in result.contestant(condition).samples if s == s]
        percentiles[condition] = {f"p{q}": percentile(values, q / 100) for q in (50, 90, 99)}
        for q in (50, 99):
            result.add_figure(f"{condition} p{q}", percentiles[condition][f"p{q}"], "s", None,
                              judged=judged)
    result.add_ratio(LOADED, IDLE, None, judged=judged)
    writes = report.get("write_seconds", [])
    deleted = report.get("deleted", [])
    result.add_figure("task-runner write transaction p99 (under load)",
                      percentile(writes, 0.99), "s", None, judged=judged)
    if report.get("write_errors"):
        result.ok = False
        result.notes.append(f"task runner: {len(report['write_errors'])} write(s) failed, first:"
                            f" {report['write_errors'][0]}")
    if report.get("deletions_exhausted"):
        result.notes.append("the background deleter ran out of victims: the last loaded block"
                            " had less background than planned")
    result.notes.append(
        f"background: {report.get('writes', 0)} task-runner writes (p50"
        f" {percentile(writes, 0.5) * 1000:.1f} ms, p99 {percentile(writes, 0.99) * 1000:.1f} ms"
        f" each, BEGIN IMMEDIATE to COMMIT) and {len(deleted)} app dirs removed in"
        f" {loaded_time:.1f} s of load: {report.get('writes', 0) / max(loaded_time, 1e-9):.1f}"
        f" writes/s, {len(deleted) / max(loaded_time, 1e-9):.1f} deletions/s achieved"
    )
    for condition in (IDLE, LOADED):
        p = percentiles[condition]
        result.notes.append(
            f"{condition}: p50 {p['p50'] * 1000:.1f} ms, p90 {p['p90'] * 1000:.1f} ms,"
            f" p99 {p['p99'] * 1000:.1f} ms over {len(result.contestant(condition).samples)}"
            f" samples; emptying the dir first took"
            f" {statistics.median(emptying[condition] or [float('nan')]) * 1000:.1f} ms (median)"
        )
    result.details.update({
        "percentiles_seconds": percentiles,
        "emptying_seconds": emptying,
        "background": {
            "writes": report.get("writes", 0),
            "write_seconds_p50": percentile(writes, 0.5),
            "write_seconds_p99": percentile(writes, 0.99),
            "write_errors": report.get("write_errors", []),
            "deleted": len(deleted),
            "loaded_seconds": loaded_time,
            "writes_per_second_achieved": report.get("writes", 0) / max(loaded_time, 1e-9),
            "deletions_per_second_achieved": len(deleted) / max(loaded_time, 1e-9),
        },
        "block_order": order,
        "clock": "from just before the rmdir of the app directory (emptied first, as rm -rf"
        " does) to the first poll that sees the row gone and no active task",
    })
    note_load(result, load)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        sys.exit(load_main(sys.argv[2:]))
    sys.exit("bench_growth.py is a benchmark module; run scripts/bench (or 'load ...' as the"
             " latency-load background process)")
