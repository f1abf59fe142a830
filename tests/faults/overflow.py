"""Overflow (issue 5, item 4): a real flood that overflows the kernel's inotify queue.

**Real** (``overflow-real``): the daemon runs as its own process (``fswatch-sync run``, with the
root logger set up so that watchdog's own warnings reach stderr too). Once its start-up sweep is
done it is frozen with SIGSTOP — every thread, the inotify reader included — and a watched model
directory is flooded with files created and deleted, twice as many events as the kernel's
``/proc/sys/fs/inotify/max_queued_events``. The queue is then full, so the ``rm -rf`` of an app
directory made next is an event the kernel drops. On SIGCONT the daemon reads the queue, meets
``IN_Q_OVERFLOW``; watchdog logs it, the adapter's detector catches that log record, and a full
sweep follows: a ``fswatch_sync_sweeps`` row with trigger ``overflow``, and the orphan whose event
was lost removed by that sweep (the journal names the sweep, not the reactor, as its source).
Every other app keeps its row; SIGTERM then stops the daemon with status 0.

Nothing is lowered: the flood is sized from the machine's own limit (up to a cap; a machine
whose limit is higher than the cap is not flooded and the scenario says so — Unavailable).

**Injected** (``overflow-injected``, clearly a fallback, for any machine): in a running
:class:`Service`, the overflow log record is emitted on watchdog's logger exactly as watchdog
words it (so the adapter's detector is still what notices), with an orphan whose directory was
removed while nobody watched; the same sweep must follow.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from helpers import make_settings, wait_until
from sqlalchemy.engine import Engine
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, WatchDescriptor

from faults.harness import Run, Unavailable, scenario
from faults.kit import (
    TaskSeed,
    app_keys,
    clear_rows,
    insert_apps,
    insert_tasks,
    journal_rows,
    prepare_database,
    probe_engine,
    remove_tree,
    sweep_rows,
    task_rows,
)
from faults.servers import scratch_database
from fswatch_sync import db, signals
from fswatch_sync.layout import AppKey
from fswatch_sync.service import Service

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
FLOOD_CAP_EVENTS = 1_000_000
WATCHDOG_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"
WATCHDOG_OVERFLOW_MESSAGE = "Inotify queue overflowed; filesystem events were lost"
OUR_OVERFLOW_MESSAGE = "filesystem events were lost (queue overflow); a full sweep follows"

KEPT = (AppKey("m", 1), AppKey("m", 2), AppKey("m", 4), AppKey("n", 1), AppKey("n", 2))
ORPHAN = AppKey("m", 3)

# The daemon, with watchdog's own log records on stderr as well as the tool's.
DAEMON = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.WARNING, stream=sys.stderr,"
    " format='%(levelname)s %(name)s: %(message)s')\n"
    "from fswatch_sync.cli import main\n"
    "sys.exit(main(['run']))\n"
)


def kernel_queue_limit() -> int:
    try:
        return int(MAX_QUEUED_EVENTS.read_text().strip())
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot read {MAX_QUEUED_EVENTS}: {exc}") from None


def seed_world(database_url: str, root: Path) -> dict[str, int]:
    """Apps m/app1..4 and n/app1..2 on disk with old rows, and a ``flood`` model directory."""
    (root / "flood").mkdir(parents=True)
    for key in (*KEPT, ORPHAN):
        (root / key.model_slug / f"app{key.app_number}" / "src").mkdir(parents=True)
    old = db.utcnow() - timedelta(hours=2)
    with probe_engine(database_url) as probe:
        clear_rows(probe)
        insert_apps(probe, [(key, old) for key in (*KEPT, ORPHAN)])
        return insert_tasks(
            probe,
            [TaskSeed(f"{k.model_slug}-{k.app_number}", k, "pending", db.utcnow())
             for k in (*KEPT, ORPHAN)],
        )


def flood(directory: Path, events: int) -> float:
    """At least ``events`` inotify events in ``directory``: files created and deleted, as an
    unpacking or an ``rm -rf`` of a build tree makes them (counted as two events each, though
    the watch also sees each open and close); returns the seconds taken."""
    started = time.monotonic()
    target = os.fspath(directory)
    for index in range(events // 2 + 1):
        path = f"{target}/f{index}"
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        os.unlink(path)
    return time.monotonic() - started


def check_outcome(probe: Engine, orphan_source: str) -> None:
    present = app_keys(probe)
    assert ORPHAN not in present, "the orphan was not removed"
    assert set(KEPT) <= present, f"wrongly removed: {sorted(set(KEPT) - present)}"
    removals = [e for e in journal_rows(probe) if e["action"] == "app_removed"]
    sources = {(e["model_slug"], e["app_number"]): e["source"] for e in removals}
    assert sources == {tuple(ORPHAN): orphan_source}, sources
    tasks = {row["task_id"]: row for row in task_rows(probe).values()}
    assert tasks["m-3"]["status"] == "cancelled", tasks["m-3"]
    for key in KEPT:
        assert tasks[f"{key.model_slug}-{key.app_number}"]["status"] == "pending"


@contextmanager
def daemon(database_url: str, root: Path, stderr_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSWATCH_SYNC_",
                                                                    "MAINTENANCE_"))}
    env.update({
        "FSWATCH_SYNC_ROOT": str(root),
        "FSWATCH_SYNC_DATABASE_URL": database_url,
        "FSWATCH_SYNC_OBSERVER": "native",
        "FSWATCH_SYNC_INTERVAL_SECONDS": "3600",
    })
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", DAEMON], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def finished_sweeps(probe: Engine, trigger: str) -> list[dict[str, Any]]:
    return [r for r in sweep_rows(probe) if r["trigger"] == trigger and r["finished_at"]]


def real_overflow_round(database_url: str, workdir: Path) -> dict[str, Any]:
    limit = kernel_queue_limit()
    events = 2 * limit + 1000
    if events > FLOOD_CAP_EVENTS:
        raise Unavailable(
            f"max_queued_events is {limit}: a flood past it would take {events} events"
            f" (cap {FLOOD_CAP_EVENTS}); use overflow-injected here"
        )
    root = workdir / "generated" / "apps"
    seed_world(database_url, root)
    stderr_path = workdir / "daemon.stderr"
    with probe_engine(database_url) as probe, daemon(database_url, root, stderr_path) as process:
        wait_until(lambda: finished_sweeps(probe, "startup"), timeout=60,
                   what="the daemon's start-up sweep")
        wait_until(lambda: process.poll() is None, what="the daemon running")
        os.kill(process.pid, signal.SIGSTOP)
        try:
            seconds = flood(root / "flood", events)
            remove_tree(root / ORPHAN.model_slug / f"app{ORPHAN.app_number}")  # event dropped
        finally:
            os.kill(process.pid, signal.SIGCONT)
        wait_until(lambda: finished_sweeps(probe, "overflow"), timeout=120,
                   what="a sweep with trigger 'overflow'")
        wait_until(lambda: ORPHAN not in app_keys(probe), timeout=30, what="the orphan removed")
        sweep = finished_sweeps(probe, "overflow")[0]
        assert sweep["outcome"] == "ok" and sweep["orphan_apps"] == 1, sweep
        check_outcome(probe, orphan_source="sweep")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    text = stderr_path.read_text(errors="replace")
    assert code == 0, f"daemon exit status {code}: {text[-800:]}"
    assert f"{WATCHDOG_OVERFLOW_LOGGER}: {WATCHDOG_OVERFLOW_MESSAGE}" in text, (
        f"watchdog did not log the overflow: {text[-800:]}"
    )
    assert OUR_OVERFLOW_MESSAGE in text, f"the detector did not fire: {text[-800:]}"
    assert "Traceback" not in text, text[-2000:]
    return {"limit": limit, "events": events, "flood_seconds": round(seconds, 2)}


@contextmanager
def quieted_watchdog(level: int | None) -> Iterator[None]:
    """A host application that silenced watchdog's logging below ``level`` (None: as is)."""
    logger = logging.getLogger("watchdog")
    saved = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def injected_overflow_round(
    database_url: str, workdir: Path, *, host_watchdog_level: int | None = None
) -> dict[str, Any]:
    """The fallback: the kernel's overflow event injected into a running Service's observer.

    With ``host_watchdog_level`` the host has quieted the ``watchdog`` logger (ERROR, say, as
    applications do with noisy libraries) before the service starts: the overflow must still
    be noticed.
    """
    root = workdir / "generated" / "apps"
    seed_world(database_url, root)
    # The orphan's directory goes while nobody watches: no event will ever tell of it.
    remove_tree(root / ORPHAN.model_slug / f"app{ORPHAN.app_number}")
    degraded: list[str] = []

    def on_degraded(_sender: Any, reason: str = "", **_extra: Any) -> None:
        degraded.append(reason)

    service = Service(make_settings(root, database_url), instance_id="overflow-injected",
                      initial_sweep=False)
    with probe_engine(database_url) as probe, signals.watch_degraded.connected_to(
        on_degraded
    ), quieted_watchdog(host_watchdog_level):
        service.start()
        try:
            assert ORPHAN in app_keys(probe)
            # The kernel's IN_Q_OVERFLOW, handed to the service's own inotify instance as its
            # reader hands what it reads (watchdog logs it there; the watcher must notice).
            reader = service.watcher._observer._inotify_fd  # type: ignore[union-attr]
            reader.handle_event(
                InotifyEvent(WatchDescriptor(-1), InotifyConstants.IN_Q_OVERFLOW, 0, b"")
            )
            wait_until(lambda: finished_sweeps(probe, "overflow"), what="the overflow sweep")
            wait_until(lambda: ORPHAN not in app_keys(probe), what="the orphan removed")
            check_outcome(probe, orphan_source="sweep")
            assert "overflow" in degraded, degraded
        finally:
            service.stop()
    return {"degraded": degraded}


@scenario(
    "overflow-real",
    backends=("sqlite", "postgres", "mysql"),
    quick=1,
    long=10,
    summary="the daemon (a process) frozen with SIGSTOP while a watched model dir gets file"
    " create/delete pairs for twice the kernel's max_queued_events, then an app dir is rm -rf'd"
    " (its event dropped by the full queue); on SIGCONT watchdog logs the overflow, the"
    " detector fires, a sweep with trigger 'overflow' removes the orphan (journal source:"
    " sweep), every other row stays, SIGTERM exits 0. Nothing lowered: real kernel overflow",
    timeout_s=1800,
)
def overflow_real(run: Run) -> str:
    assert run.backend is not None
    info: dict[str, Any] = {}
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            info = real_overflow_round(url, run.workdir / f"round{index}")
            remove_tree(run.workdir / f"round{index}")
    return (
        f"{run.rounds} real overflow(s): {info['events']} events vs max_queued_events"
        f" {info['limit']} (flood {info['flood_seconds']} s); overflow logged, detected,"
        " swept; lost orphan removed by the sweep"
    )


@scenario(
    "overflow-injected",
    backends=("sqlite", "postgres", "mysql"),
    quick=1,
    long=5,
    summary="FALLBACK, injected at the adapter: the kernel's IN_Q_OVERFLOW event handed to a"
    " running Service's own inotify instance (watchdog's handling and the watcher's detector"
    " still do the rest), also with the host having quieted the 'watchdog' logger to ERROR;"
    " watch_degraded 'overflow' sent, a sweep with trigger 'overflow' removes an orphan no"
    " event told of",
    timeout_s=600,
)
def overflow_injected(run: Run) -> str:
    assert run.backend is not None
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            for level in (None, logging.ERROR):
                work = run.workdir / f"round{index}-{level}"
                injected_overflow_round(url, work, host_watchdog_level=level)
                remove_tree(work)
    return (
        f"{run.rounds} x 2 injected overflows (watchdog logging as is, and quieted to ERROR by"
        " the host): detected, degraded signalled, swept, orphan removed"
    )


__all__ = ["injected_overflow_round", "kernel_queue_limit", "real_overflow_round"]
