"""Issue 3's idle figure: what the daemon costs while nothing happens.

``python -m fswatch_sync run`` starts on a tree of 5,000 apps (20 model directories x 250 apps,
22 directories below each) and a SQLite file holding their rows and tasks. Once its start-up
sweep has finished, it is left alone for a 10 s window: the CPU time it used in that window
(``utime + stime`` from ``/proc/<pid>/stat``, all threads) and its resident memory at the end
(``VmRSS`` from ``/proc/<pid>/status``; the peak ``VmHWM``, start-up sweep included, is shown
too). Each run starts a fresh daemon on a fresh copy of the database.

The comparison, in the same run and the same way: a process running watchdog's recursive
observer on the same tree and nothing else. (The seed's hourly cleanup thread lives inside the
web app and sleeps between runs; it costs next to nothing while idle and is not a process of its
own, so it is not a contestant here.) The kernel memory behind inotify watches is not part of
any process's RSS; it is shown as the watch count (about 1 KiB of kernel memory each on 64-bit
Linux).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench_events import (
    APP_SUBDIRS,
    cpu_seconds,
    inotify_watches,
    load_average,
    note_load,
    note_problems,
    running_daemon,
    shared_tree,
    status_kib,
    subdir_count,
)
from bench_watch import TreeSize, overflows, spawn
from benchkit import Contestant, Options, Result, Target, entry

IDLE_FULL = TreeSize(models=20, apps_per_model=250)
IDLE_QUICK = TreeSize(models=2, apps_per_model=10)
WINDOW_FULL_SECONDS = 10.0
WINDOW_QUICK_SECONDS = 1.0
PER_SECONDS = 10.0  # CPU is reported per 10 s, whatever the window

NAMES = ("fswatch_sync", "watchdog recursive")
DESCRIPTIONS = {
    "fswatch_sync": "python -m fswatch_sync run (default settings), after its start-up sweep",
    "watchdog recursive": "a process running Observer().schedule(handler, root, recursive=True)",
}


def idle_window(process: subprocess.Popen[bytes] | subprocess.Popen[str], window: float
                ) -> tuple[float, int, int, int]:
    """CPU seconds used by ``process`` during ``window`` seconds, then VmRSS, VmHWM (KiB) and
    its inotify watches. The window is a measurement interval: it is spent waiting for the
    process, so a process that dies during it is noticed at once."""
    pid = process.pid
    before = cpu_seconds(pid)
    try:
        status = process.wait(timeout=window)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise RuntimeError(f"the process exited with {status} while it was idle")
    used = cpu_seconds(pid) - before
    return used, status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM"), inotify_watches(pid)


def run_fswatch_sync(root: Path, database: Path, log_path: Path, window: float
                     ) -> tuple[tuple[float, int, int, int], list[str]]:
    """The idle window's figures, and the problems the daemon logged."""
    with running_daemon(root, database, log_path) as daemon:
        return idle_window(daemon.process, window), daemon.problems()


def run_watchdog(root: Path, log_path: Path, window: float) -> tuple[float, int, int, int]:
    child = spawn("watchdog recursive", root, Path("unused.db"), log_path)
    try:
        said, _ = child.wait_ready()
        if "error" in said:
            raise RuntimeError(f"watchdog recursive: {said['error']}")
        return idle_window(child.process, window)
    finally:
        child.finish()


@entry("idle", "the daemon idle for 10 s on a 5,000-app tree: CPU seconds and RSS")
def idle(options: Options) -> Result:
    size = IDLE_QUICK if options.quick else IDLE_FULL
    window = WINDOW_QUICK_SECONDS if options.quick else WINDOW_FULL_SECONDS
    result = Result(
        entry="idle",
        title=f"idle for {window:g} s after start-up on {size.models * size.apps_per_model:,}"
        " apps: CPU per 10 s and resident memory",
        contestants=[
            Contestant(f"{name} CPU per 10 s", description=DESCRIPTIONS[name]) for name in NAMES
        ] + [
            Contestant(f"{name} RSS", unit="MB", description=DESCRIPTIONS[name]) for name in NAMES
        ],
    )
    peaks: dict[str, list[float]] = {name: [] for name in NAMES}
    watches: dict[str, list[int]] = {name: [] for name in NAMES}
    lost: list[int] = []
    tree = shared_tree(options, size.models, size.apps_per_model)
    load = load_average()
    database = options.workdir / "run.db"
    result.sizes = {"apps": len(tree.keys), "subdirs_per_app": subdir_count(APP_SUBDIRS),
                    "tasks": len(tree.keys) * 10, "window_seconds": window,
                    "runs_each": options.runs}
    try:
        for run in range(options.runs):
            shift = run % len(NAMES)
            for name in NAMES[shift:] + NAMES[:shift]:
                if name == "fswatch_sync":
                    tree.fresh_database(database)
                    (cpu, rss, hwm, count), problems = run_fswatch_sync(
                        tree.root, database, options.workdir / "daemon.log", window
                    )
                    note_problems(result, problems)
                else:
                    log_path = options.workdir / "watchdog.log"
                    cpu, rss, hwm, count = run_watchdog(tree.root, log_path, window)
                    lost.append(overflows(log_path))
                result.contestant(f"{name} CPU per 10 s").samples.append(
                    cpu * PER_SECONDS / window
                )
                result.contestant(f"{name} RSS").samples.append(round(rss / 1024, 1))
                peaks[name].append(round(hwm / 1024, 1))
                watches[name].append(count)
                options.log(f"idle run {run + 1}/{options.runs} {name}: {cpu:.3f} s CPU in"
                            f" {window:g} s, RSS {rss / 1024:.1f} MB, {count:,} watches")
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
    judged = not options.quick
    result.add_figure("fswatch_sync CPU per 10 s (median)",
                      result.contestant("fswatch_sync CPU per 10 s").median, "s",
                      Target("<=", 0.2), judged=judged)
    result.add_figure("fswatch_sync RSS (median)", result.contestant("fswatch_sync RSS").median,
                      "MB", Target("<=", 120), judged=judged)
    result.add_figure("fswatch_sync peak RSS, start-up sweep included (max)",
                      max(peaks["fswatch_sync"]), "MB", None, judged=judged)
    result.add_ratio("watchdog recursive RSS", "fswatch_sync RSS", None, judged=judged)
    result.details = {
        "peak_rss_mb": peaks,
        "inotify_watches_at_end": watches,
        "watchdog_queue_overflows": lost,
        "cpu_source": "/proc/<pid>/stat utime+stime (clock ticks), all threads",
        "rss_source": "/proc/<pid>/status VmRSS at the end of the window",
    }
    result.notes.append(
        f"inotify watches at the end of the window: fswatch_sync {max(watches['fswatch_sync']):,},"
        f" watchdog recursive {min(watches['watchdog recursive']):,} to"
        f" {max(watches['watchdog recursive']):,} (kernel memory, not in RSS)"
    )
    if any(lost):
        result.notes.append(
            f"watchdog recursive overflowed its kernel event queue {min(lost)} to {max(lost)}"
            " times per run: walking the tree to add its watches queues open/close events for"
            " every directory, the queue (max_queued_events) overflows, and watchdog drops and"
            " re-adds every watch, walking the tree again; it never settles, and while it"
            " rebuilds most of the tree is unwatched"
        )
    note_load(result, load)
    return result
