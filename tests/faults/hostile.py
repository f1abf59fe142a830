"""Hostile input: a directory tree and database rows built to trip a careless implementation.

The tree holds names that are not apps (``app``, ``app01``, ``app-1``, ``APP1``, ``app1.bak``...),
names that are not UTF-8, symlink loops, dangling symlinks, symlinks to a directory outside the
root (an app directory and a whole model directory), a FIFO and a regular file where an app
directory belongs, huge numbers in names; the database holds rows whose slug carries ``..`` or
``/`` and rows with huge or negative app numbers. Outside the root sit directories that a
careless ``root / slug / f"app{n}"`` would find (``{root}/../app1`` for the slug ``..``, the
symlinks' targets).

What must hold, through the sweep and through a running :class:`Service` (whose start-up sweep
and reactor both see the tree): nothing crashes; exactly the rows whose app is absent (by the
layout's rules: a real directory ``{root}/{slug}/app{N}``, no symlink below the root) and old are
removed, every other row stays; and nothing outside the root is read — witnessed by a CPython
audit hook (every open/scandir/listdir in this process) and by the kernel (inotify IN_OPEN and
IN_ACCESS on the outside directories), and checked once more by running the same scenario with
the outside directories removed: the outcome must be the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from helpers import make_settings, wait_until

from faults.harness import Run, Unavailable, scenario
from faults.kit import (
    InotifyAccessWatch,
    ReadAudit,
    TaskSeed,
    app_keys,
    clear_rows,
    insert_apps,
    insert_tasks,
    journal_rows,
    prepare_database,
    probe_engine,
    remove_tree,
    task_rows,
)
from faults.servers import scratch_database
from fswatch_sync import db
from fswatch_sync.layout import AppKey
from fswatch_sync.service import Service
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper

OLD = timedelta(hours=2)
YOUNG = timedelta(seconds=5)
NOT_APP_NAMES = ("app", "app01", "app-1", "APP1", "App1", "app1.bak", "app1 ", " app1", "app+1",
                 "app1\n", "app\u0661", "appl", "app1e3", "app0x1", "app 1", "-rf", "app3.bak",
                 "app03", "APP3", "app9223372036854775808", "app99999999999999999999")
NON_UTF8_NAMES = (b"app1\xff", b"\xff", b"app\xc3\x28", b"\xed\xa0\x80app1")


@dataclasses.dataclass
class HostileTree:
    base: Path
    root: Path
    outside: list[Path]  # directories outside the root that must never be read
    kept: set[AppKey]  # rows that must stay
    removed: set[AppKey]  # rows the sweep must remove (absent and old)
    young_absent: set[AppKey]  # absent but young: the sweep keeps them (grace)

    @property
    def rows(self) -> set[AppKey]:
        return self.kept | self.removed | self.young_absent


def _symlink(target: str | Path, link: Path) -> None:
    os.symlink(target, link)


def build_tree(base: Path, backend: str, rng: random.Random | None = None) -> HostileTree:
    """Lay the hostile tree under ``base`` and return which rows must stay and which must go.

    With ``rng``, more of the same drawn at random: names that are not apps (near misses of
    ``app{N}``, bytes that are not UTF-8) and rows whose slug is hostile or absent.
    """
    parent = base / "generated"
    root = parent / "apps"
    outside = base / "outside"
    m, n = root / "m", root / "n"
    for directory in (m, n, outside / "app1", outside / "app2", outside / "m" / "app3",
                      parent / "app1" / "src", root / "a" / "b" / "app1"):
        directory.mkdir(parents=True, exist_ok=True)
    (outside / "app1" / "secret.txt").write_text("must never be read\n")
    os.mkfifo(outside / "fifo")  # opening it for reading would block forever

    kept = {AppKey("m", 1), AppKey("m", 11), AppKey("m", 2147483647), AppKey("n", 1),
            AppKey("n", 2), AppKey("n", 3)}
    for key in kept:
        (root / key.model_slug / f"app{key.app_number}" / "src").mkdir(parents=True)
    # Things that are not apps next to the real ones: none of them makes app3 (or app1) present.
    for name in NOT_APP_NAMES:
        (m / name).mkdir()
    for raw in NON_UTF8_NAMES:
        os.mkdir(os.fsencode(m) + b"/" + raw)
    os.mkdir(os.fsencode(root) + b"/\xff\xfe")  # a model directory whose name is not UTF-8
    os.mkdir(os.fsencode(root) + b"/\xff\xfe/app1")
    # Symlinks in app positions: a self loop, a loop to the model dir, dangling, outside.
    _symlink("app5", m / "app5")
    _symlink("../m", m / "app6")
    _symlink("/nonexistent/fswatch-sync-test", m / "app7")
    _symlink(outside / "app1", m / "app10")
    _symlink(os.path.relpath(outside / "app2", m), m / "app12")
    # Not directories in app positions: a regular file and a FIFO.
    (m / "app8").write_text("a file where a directory belongs\n")
    os.mkfifo(m / "app9")
    # Model positions: a symlink to outside, a loop, a dangling link, a regular file.
    _symlink(outside, root / "evil")
    _symlink("loop", root / "loop")
    _symlink("/nonexistent/fswatch-sync-model", root / "dangling")
    (root / "filemodel").write_text("a file where a model directory belongs\n")
    os.mkfifo(root / "fifomodel")

    removed = {
        AppKey("m", 2),  # plainly absent
        AppKey("m", 3),  # only app03 / APP3 / app3.bak exist
        AppKey("m", 5), AppKey("m", 6), AppKey("m", 7), AppKey("m", 10), AppKey("m", 12),
        AppKey("m", 8), AppKey("m", 9),
        AppKey("m", 0), AppKey("m", -1), AppKey("m", -2147483648),
        AppKey("evil", 1), AppKey("evil", 2), AppKey("loop", 1), AppKey("dangling", 1),
        AppKey("filemodel", 1), AppKey("fifomodel", 1),
        AppKey("..", 1), AppKey(".", 1), AppKey("", 1), AppKey("../outside", 1),
        AppKey("../outside/m", 3), AppKey("a/b", 1), AppKey(str(outside), 1),
        AppKey("/", 1), AppKey("~", 1), AppKey("~/x", 1), AppKey("m/../n", 1),
        AppKey("m\\..\\n", 1), AppKey("n/", 1), AppKey("./n", 1),
    }
    if backend == "sqlite":  # servers store app_number as a 32-bit INTEGER and text without NUL
        removed |= {AppKey("m", 2**31), AppKey("m", 2**40), AppKey("m", 2**63 - 1),
                    AppKey("n\x00", 1), AppKey("m", -(2**63))}
    young_absent = {AppKey("m", 4), AppKey("evil", 3), AppKey("../outside", 2)}
    if rng is not None:
        removed |= _random_extras(rng, m, root)
    return HostileTree(base, root, [outside, parent / "app1"], kept, removed, young_absent)


_NEAR_MISS_PARTS = ("", "0", "00", "1", "9", "-", ".", "_", " ", "\t", "\n", "e", "x", "+",
                    "\u0661", "\uff11", "\u00e9", "bak", "..", "~", "APP", "App")
_SLUG_PARTS = ("..", ".", "/", "\\", "~", "m", "n", "evil", "outside", "", " ", "\u00e9",
               "%2e%2e", "$HOME", "*", "?")


def _random_extras(rng: random.Random, m: Path, root: Path) -> set[AppKey]:
    """Random non-app names in ``m`` and rows that must be removed; returns those rows."""
    for _ in range(rng.randint(5, 25)):
        name = "app" + "".join(rng.choice(_NEAR_MISS_PARTS) for _ in range(rng.randint(1, 4)))
        if "/" in name or _ORACLE.fullmatch(name) or os.path.lexists(m / name):
            continue
        (m / name).mkdir()
    for _ in range(rng.randint(2, 8)):
        raw = bytes(rng.choice(range(0x80, 0x100)) for _ in range(rng.randint(1, 4)))
        for parent in (m, root):
            target = os.fsencode(parent) + b"/" + raw
            if not os.path.lexists(target):
                os.mkdir(target)
    rows: dict[tuple[str, int], AppKey] = {}
    for _ in range(rng.randint(3, 12)):
        slug = "".join(rng.choice(_SLUG_PARTS) for _ in range(rng.randint(1, 4)))
        if slug in ("m", "n") or ((root / slug).is_dir() and _is_plain(slug)):
            continue  # could be a real model directory: not an extra of known outcome
        key = AppKey(slug, rng.randint(100, 199))
        # MariaDB compares text case-blind and ignores trailing spaces: one row per such pair.
        rows.setdefault((slug.rstrip(" ").casefold(), key.app_number), key)
    return set(rows.values())


# An oracle for "is an app directory name" (up to BIGINT's 19 digits), written independently of
# the layout module; the near-miss parts never make more than four digits.
_ORACLE = re.compile(r"app(0|[1-9][0-9]{0,18})")


def _is_plain(slug: str) -> bool:
    return slug not in ("", ".", "..") and "/" not in slug


def seed_rows(database_url: str, tree: HostileTree, now: datetime) -> dict[str, int]:
    """One row per app (young or old) and one pending task for each, plus rowless tasks."""
    with probe_engine(database_url) as probe:
        clear_rows(probe)
        insert_apps(
            probe,
            [(key, now - (YOUNG if key in tree.young_absent else OLD)) for key in tree.rows],
        )
        tasks = [
            TaskSeed(f"t{i}", key, "pending", now - timedelta(minutes=1))
            for i, key in enumerate(sorted(tree.rows))
        ]
        # Tasks whose target has no row and never could: they are orphans, cancelled once.
        tasks += [
            TaskSeed(f"orphan{i}", key, "pending", now - timedelta(minutes=1))
            for i, key in enumerate([AppKey("../../etc", 1), AppKey("m", 777)])
        ]
        return insert_tasks(probe, tasks)


def check_outcome(database_url: str, tree: HostileTree, removed: set[AppKey]) -> None:
    """Rows: exactly ``removed`` gone; tasks of removed apps cancelled, all others pending."""
    with probe_engine(database_url) as probe:
        present = app_keys(probe)
        gone = tree.rows - present
        assert gone == removed, (
            f"wrongly removed: {sorted(gone - removed)}; not removed: {sorted(removed - gone)}"
        )
        tasks = task_rows(probe)
        journal = journal_rows(probe)
    for task in tasks.values():
        key = AppKey(task["target_model"], task["target_app_number"])
        expected = "pending" if key in present else "cancelled"
        assert task["status"] == expected, (key, task)
    journalled = {
        AppKey(e["model_slug"], e["app_number"]) for e in journal if e["action"] == "app_removed"
    }
    assert journalled == removed, sorted(journalled ^ removed)


class Witnesses:
    """Both witnesses of reading outside the root, with a way to excuse the test's own work."""

    def __init__(self, audit: ReadAudit, kernel: InotifyAccessWatch) -> None:
        self.audit, self.kernel = audit, kernel
        self._kernel_seen: list[str] = []

    def seen(self) -> list[str]:
        self._kernel_seen += self.kernel.events()
        return [f"audit {event} {path}" for event, path in self.audit.hits] + [
            f"inotify {what}" for what in self._kernel_seen
        ]

    @contextmanager
    def excused(self) -> Iterator[None]:
        """The test itself changes the outside directories: its own reads do not count.

        The audit ignores only this thread; the kernel cannot tell threads apart, so what it
        reports meanwhile is dropped (the window is a few system calls long).
        """
        self._kernel_seen += self.kernel.events()
        with self.audit.ignoring_this_thread():
            yield
        self.kernel.events()


@contextmanager
def witnesses(tree: HostileTree) -> Iterator[Witnesses]:
    watched = [d for d in tree.outside if d.is_dir()]
    watched += [d / name for d in watched for name in os.listdir(d) if (d / name).is_dir()]
    with ReadAudit(tree.outside) as audit, InotifyAccessWatch(watched) as kernel:
        yield Witnesses(audit, kernel)


def run_sweep(database_url: str, tree: HostileTree) -> None:
    settings = make_settings(tree.root, database_url, max_delete_fraction=1.0)
    engine = db.create_engine(database_url)
    try:
        store = Store(engine, settings.schema, batch_size=7)
        report = Sweeper(store, settings, instance_id="hostile-sweep").run()
        assert report.orphan_apps == len(tree.removed), report
        # A second sweep finds nothing left to do: the first one finished the job.
        again = Sweeper(store, settings, instance_id="hostile-sweep").run()
        assert (again.orphan_apps, again.orphan_tasks) == (0, 0), again
    finally:
        engine.dispose()


def scenario_sweep(
    database_url: str, workdir: Path, backend: str, seed: int | None = None
) -> dict[str, Any]:
    """The hostile tree (with random extras when ``seed`` is given) through one sweep; again
    with the outside directories gone, which must not change the outcome."""
    outcomes = []
    for variant in ("outside present", "outside removed"):
        base = workdir / variant.replace(" ", "-")
        tree = build_tree(base, backend, None if seed is None else random.Random(seed))
        if variant == "outside removed":
            for directory in tree.outside:
                remove_tree(directory)
        now = db.utcnow()
        seed_rows(database_url, tree, now)
        with witnesses(tree) as seen:
            run_sweep(database_url, tree)
            reads = seen.seen()
        assert reads == [], f"read outside the root ({variant}): {reads[:5]}"
        check_outcome(database_url, tree, tree.removed)
        with probe_engine(database_url) as probe:
            gone = tree.rows - app_keys(probe)
        # The slug naming the outside directory by its absolute path differs per variant.
        outcomes.append({
            AppKey("<outside>", k.app_number) if k.model_slug == str(tree.outside[0]) else k
            for k in gone
        })
    assert outcomes[0] == outcomes[1], "the outside directories changed the outcome"
    return {"rows": len(tree.rows), "removed": len(tree.removed), "variants": 2}


def _service_alive(service: Service) -> bool:
    return all(thread.is_alive() for thread in service._threads) and service.watcher.is_alive()


def scenario_service(database_url: str, workdir: Path, backend: str) -> dict[str, Any]:
    """The hostile tree under a running Service: start-up sweep, then live hostile changes.

    Live changes, each of which the reactor sees as events: non-UTF-8 directories created and
    removed (in a model directory and at the root), symlinks created and removed (one of them a
    new model directory pointing outside, inside whose target directories come and go), the
    FIFO and the file in app positions removed, a real app directory renamed to ``app11.bak``
    (SPEC: renamed so it no longer matches -> removed), a model directory replaced by a file
    (-> its apps removed), and a last ``rm -rf`` of a sentinel app whose removal, once seen,
    proves every earlier event was applied.
    """
    tree = build_tree(workdir / "svc", backend)
    now = db.utcnow()
    seed_rows(database_url, tree, now)
    young = now  # rows added now are young: only the reactor could remove them
    # Young rows whose positions see only hostile changes: only the reactor could remove them,
    # and it must not (evil2 is a symlink to outside: its events must never reach the reactor).
    live_young = {AppKey("evil2", 1), AppKey("evil2", 2), AppKey("m", 41)}
    sentinel = AppKey("n", 3)
    with probe_engine(database_url) as probe:
        insert_apps(probe, [(key, young) for key in live_young])
    settings = make_settings(tree.root, database_url, max_delete_fraction=1.0)
    with witnesses(tree) as seen:
        service = Service(settings, instance_id="hostile-service")
        service.start()
        try:
            with probe_engine(database_url) as probe:
                wait_until(
                    lambda: not (tree.removed & app_keys(probe)), what="the start-up sweep"
                )
                check_outcome_subset(probe, tree.removed, keep=tree.kept | tree.young_absent)
                outside = tree.outside[0]
                m, root = tree.root / "m", tree.root
                # Hostile live changes.
                for raw in (b"app40\xff", b"\xfe\xff"):
                    os.mkdir(os.fsencode(m) + b"/" + raw)
                    os.rmdir(os.fsencode(m) + b"/" + raw)
                os.mkdir(os.fsencode(root) + b"/\xc0\xc1")
                os.mkdir(os.fsencode(root) + b"/\xc0\xc1/app1")
                remove_tree(os.fsencode(root) + b"/\xc0\xc1")
                remove_tree(os.fsencode(root) + b"/\xff\xfe")
                os.symlink(outside, root / "evil2")  # a new model dir that is a symlink
                with seen.excused():  # outside: never watched, must change nothing
                    for name in ("app1", "app2"):
                        remove_tree(outside / name)
                    (outside / "app1").mkdir()
                    os.rmdir(outside / "app1")
                os.symlink("app42", m / "app42")  # a self loop in an app position, then gone
                os.unlink(m / "app42")
                for name in ("app8", "app9", "app10", "app12", "app5", "app6", "app7"):
                    if os.path.lexists(m / name):
                        os.unlink(m / name)
                os.unlink(root / "loop")
                os.unlink(root / "filemodel")
                os.unlink(root / "fifomodel")
                os.rename(m / "app11", m / "app11.bak")
                shutil.rmtree(root / "n" / "app2")
                remove_tree(root / "a")
                expected_gone = {AppKey("m", 11), AppKey("n", 2), sentinel}
                shutil.rmtree(root / "n" / "app3")  # the sentinel, last
                wait_until(
                    lambda: not (expected_gone & app_keys(probe)), what="the live removals"
                )
                assert _service_alive(service), "a service thread died"
                keep = (tree.kept - expected_gone) | tree.young_absent | live_young
                check_outcome_subset(probe, tree.removed | expected_gone, keep=keep)
                stats = service.status_stats()
                assert stats.get("errors", 0) == 0, stats
        finally:
            service.stop()
        reads = seen.seen()
    assert reads == [], f"read outside the root: {reads[:5]}"
    return {"rows": len(tree.rows) + len(live_young), "live_changes": 24}


def check_outcome_subset(probe: Any, gone: set[AppKey], *, keep: set[AppKey]) -> None:
    present = app_keys(probe)
    assert not (gone & present), f"not removed: {sorted(gone & present)}"
    assert keep <= present, f"wrongly removed: {sorted(keep - present)}"


# -- a root whose own path is hostile --------------------------------------------------------


def scenario_root_path(database_url: str, workdir: Path) -> dict[str, Any]:
    """A root whose path is not UTF-8 and holds a newline and spaces.

    A running Service starts (its heartbeat stores the root), reacts to an ``rm -rf``; the
    command line sweeps it (``--json``), and refuses with exit 3 once it is gone.
    """
    base = os.fsencode(workdir) + b"/gen\xff\nerated apps"
    root_bytes = base + b"/apps \xfe"
    os.makedirs(root_bytes)
    root = Path(os.fsdecode(root_bytes))
    keys = [AppKey("m", 1), AppKey("m", 2), AppKey("m", 3)]
    for key in keys:
        (root / key.model_slug / f"app{key.app_number}" / "src").mkdir(parents=True)
    now = db.utcnow()
    with probe_engine(database_url) as probe:
        clear_rows(probe)
        insert_apps(probe, [(key, now - OLD) for key in keys])
        insert_tasks(probe, [TaskSeed(f"t{k.app_number}", k, "pending", now) for k in keys])
        service = Service(make_settings(root, database_url), instance_id="hostile-root")
        service.start()
        try:
            wait_until(lambda: service.status_stats().get("sweeps", 0) >= 1, what="start-up sweep")
            shutil.rmtree(root / "m" / "app2")
            wait_until(lambda: AppKey("m", 2) not in app_keys(probe), what="reactor removal")
            assert _service_alive(service), "a service thread died"
            assert service.status_stats().get("errors", 0) == 0, service.status_stats()
        finally:
            service.stop()
        assert app_keys(probe) == {AppKey("m", 1), AppKey("m", 3)}
    environ = {k: v for k, v in os.environb.items()
               if not k.startswith((b"FSWATCH_SYNC_", b"MAINTENANCE_"))}
    environ[b"FSWATCH_SYNC_ROOT"] = root_bytes
    environ[b"FSWATCH_SYNC_DATABASE_URL"] = database_url.encode()
    shutil.rmtree(root / "m" / "app3")
    swept = subprocess.run(
        [sys.executable, "-m", "fswatch_sync", "sweep", "--json"], env=environ,
        capture_output=True, timeout=60, check=False,
    )
    assert swept.returncode == 0, swept.stderr.decode(errors="replace")[-500:]
    assert json.loads(swept.stdout)["orphan_apps"] == 1, swept.stdout
    remove_tree(root_bytes)
    refused = subprocess.run(
        [sys.executable, "-m", "fswatch_sync", "sweep"], env=environ,
        capture_output=True, timeout=60, check=False,
    )
    err = refused.stderr.decode(errors="replace")
    # Exit 3, no traceback, and the refusal on one line although the root's path holds a
    # newline (besides it, stderr has the sweep's own log line).
    assert refused.returncode == 3, (refused.returncode, err[-500:])
    assert "Traceback" not in err, err[-500:]
    refusals = [line for line in err.splitlines() if line.startswith("fswatch-sync: refused:")]
    assert len(refusals) == 1 and refusals[0].endswith("nothing was changed"), err[-500:]
    return {"root": os.fsdecode(root_bytes)}


# -- names a case-blind, space-padding collation confuses ----------------------------------


def scenario_collation(database_url: str, workdir: Path) -> dict[str, Any]:
    """Directories ``m``, ``M`` and ``m `` (trailing space) side by side. MariaDB's default
    collation compares text case-blind and ignores trailing spaces, so a query for the app
    ``M/app1`` or ``m /app1`` finds the row of ``m/app1``. Removing those look-alikes (the
    reactor's hints name them) must never take ``m/app1``'s row or tasks: the removal re-checks
    the row it actually locked. A sweep and a running Service, on every backend."""
    root = workdir / "generated" / "apps"
    for name in ("m/app1", "m /app1", "M/app1", "M/app2", "M/app3", "m /app3", "n/app1"):
        (root / name / "src").mkdir(parents=True)
    rows = [AppKey("m", 1), AppKey("M", 2), AppKey("m", 3), AppKey("n", 1)]
    old = db.utcnow() - OLD
    with probe_engine(database_url) as probe:
        clear_rows(probe)
        insert_apps(probe, [(key, old) for key in rows])
        fresh = db.utcnow()  # not stuck: only a removal may cancel these
        insert_tasks(probe, [TaskSeed(f"{k.model_slug}{k.app_number}", k, "pending", fresh)
                             for k in rows])
        service = Service(make_settings(root, database_url, max_delete_fraction=1.0),
                          instance_id="hostile-collation")
        service.start()
        try:
            # The start-up sweep: m/app3 has only look-alikes (M/app3, "m /app3") on disk.
            wait_until(lambda: AppKey("m", 3) not in app_keys(probe), what="start-up sweep")
            for name in ("m /app1", "M/app1", "M/app2"):
                remove_tree(root / name)
            remove_tree(root / "n" / "app1")  # the sentinel, last
            wait_until(lambda: AppKey("n", 1) not in app_keys(probe), what="the sentinel")
            wait_until(lambda: service.reactor.pending() == 0, what="an empty queue")
            assert _service_alive(service)
        finally:
            service.stop()
        present = app_keys(probe)
        tasks = {row["task_id"]: row["status"] for row in task_rows(probe).values()}
    assert present == {AppKey("m", 1)}, sorted(present)
    assert tasks == {"m1": "pending", "M2": "cancelled", "m3": "cancelled", "n1": "cancelled"}, (
        tasks
    )
    return {"rows": len(rows)}


# -- a model directory swapped for a symlink while the tool looks ---------------------------

SWAPPER = """
import os, sys, time
root, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
swaps = 0
while time.monotonic() < end:
    os.rename(root + '/evil', root + '/.evil-real'); os.rename(root + '/.evil-link', root + '/evil')
    os.rename(root + '/evil', root + '/.evil-link'); os.rename(root + '/.evil-real', root + '/evil')
    swaps += 1
print(swaps)
"""

# The looker: what the sweep, the reactor's re-check and the root checks do to the disk, in a
# loop, in a process without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so that the outside
# directory's mode 000 holds for it: every listing of, or lookup in, the outside directory is
# refused by the kernel, and every refusal is recorded here before the code under test sees
# (and perhaps swallows) it. The kernel checks at the very instant of the call: no race in the
# witness, whatever instant the swap lands at.
LOOKER = """
import json, os, sys, time
from pathlib import Path
denied = []
def witness(function):
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PermissionError:
            denied.append(f"{function.__name__} {args[0]!r}")
            raise
    return call
for name in ("stat", "lstat", "scandir", "listdir", "open"):
    setattr(os, name, witness(getattr(os, name)))
from fswatch_sync.layout import AppKey, any_app_dir, app_exists, model_dirs, root_present
from fswatch_sync.layout import scan_tree
root, seconds = Path(sys.argv[1]), float(sys.argv[2])
keys = [AppKey("evil", 1), AppKey("evil", 2), AppKey("evil", 3), AppKey("m", 1)]
print("ready", flush=True)
sys.stdin.readline()
end, rounds = time.monotonic() + seconds, 0
while time.monotonic() < end:
    scan_tree(root); any_app_dir(root); list(model_dirs(root)); root_present(root)
    for key in keys:
        app_exists(root, key)
    rounds += 1
print(json.dumps({"rounds": rounds, "denied": len(denied), "examples": denied[:5]}))
"""


def scenario_symlink_swap(workdir: Path, seconds: float) -> dict[str, Any]:
    """A model directory ``evil`` (real, with apps) is swapped, by another process as fast as
    it can rename, with a symlink to a directory outside the root and back, while a looker
    process does what the sweep and the reactor do to the disk. The outside directory is mode
    000 and the looker runs without the capabilities that let root ignore that, so any listing
    of or lookup in it — at whatever instant the swap lands — is refused and recorded."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        raise Unavailable("needs root and setpriv to run the looker without DAC capabilities")
    root = workdir / "generated" / "apps"
    outside = workdir / "outside"
    for path in (root / "evil" / "app1", root / "evil" / "app2", root / "m" / "app1",
                 outside / "app1", outside / "app2", outside / "app3"):
        path.mkdir(parents=True)
    os.symlink(outside, root / ".evil-link")
    os.chmod(outside, 0o000)
    drop = "-dac_override,-dac_read_search"
    looker = subprocess.Popen(
        ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c",
         LOOKER, str(root), str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert looker.stdout is not None and looker.stdin is not None
        assert looker.stdout.readline().strip() == "ready"
        swapper = subprocess.Popen(
            [sys.executable, "-c", SWAPPER, str(root), str(seconds + 0.5)],
            stdout=subprocess.PIPE, text=True,
        )
        looker.stdin.write("go\n")
        looker.stdin.flush()
        out, _ = looker.communicate(timeout=seconds + 60)
        swaps, _ = swapper.communicate(timeout=60)
    finally:
        os.chmod(outside, 0o755)
        if looker.poll() is None:
            looker.kill()
    assert looker.returncode == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["denied"] == 0, (
        f"{result['denied']} listing(s)/lookup(s) outside the root: {result['examples']}"
    )
    return {"rounds": result["rounds"], "swaps": int(swaps.strip() or 0)}


# -- hostile settings ------------------------------------------------------------------------

# (label, environment, TOML text) — each must stop the program with exit 2 and one line.
HOSTILE_SETTINGS: tuple[tuple[str, dict[str, str], str], ...] = (
    ("NUL in root (TOML)", {}, 'root = "gen\\u0000erated/apps"\n'),
    ("NUL in database URL (TOML)", {}, 'database_url = "sqlite:///x\\u0000.db"\n'),
    ("NUL in root marker (TOML)", {}, 'root_marker = "a\\u0000"\n'),
    ("root is a number", {}, "root = 5\n"),
    ("root is a table", {}, "root = {path = 'x'}\n"),
    ("root empty", {"FSWATCH_SYNC_ROOT": ""}, ""),
    ("root's parent missing", {"FSWATCH_SYNC_ROOT": "/nonexistent/a/b"}, ""),
    ("interval inf", {"FSWATCH_SYNC_INTERVAL_SECONDS": "inf"}, ""),
    ("interval nan", {}, "interval_seconds = nan\n"),
    ("interval -inf", {}, "interval_seconds = -inf\n"),
    ("interval 1e999", {"FSWATCH_SYNC_INTERVAL_SECONDS": "1e999"}, ""),
    ("interval 1e300", {"FSWATCH_SYNC_INTERVAL_SECONDS": "1e300"}, ""),
    ("interval negative", {}, "interval_seconds = -5\n"),
    ("interval zero", {}, "interval_seconds = 0\n"),
    ("interval a string of words", {"FSWATCH_SYNC_INTERVAL_SECONDS": "an hour"}, ""),
    ("interval an array", {}, "interval_seconds = [3600]\n"),
    ("interval a date", {}, "interval_seconds = 2026-01-01\n"),
    ("interval a boolean", {}, "interval_seconds = true\n"),
    ("running timeout 1e300 minutes", {}, "running_timeout_minutes = 1e300\n"),
    ("running timeout 1e10 minutes", {}, "running_timeout_minutes = 1e10\n"),
    ("pending timeout 1e300 minutes", {"FSWATCH_SYNC_PENDING_TIMEOUT_MINUTES": "1e300"}, ""),
    ("retention 1e7 days", {}, "task_retention_days = 1e7\n"),
    ("retention 1e300 days", {"MAINTENANCE_TASK_RETENTION_DAYS": "1e300"}, ""),
    ("retention negative", {}, "task_retention_days = -1\n"),
    ("grace 1e300 minutes", {}, "app_grace_minutes = 1e300\n"),
    ("stuck alias huge", {"MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES": "1e300"}, ""),
    ("lease 1e300 s", {}, "lease_seconds = 1e300\n"),
    ("heartbeat 1e300 s", {}, "heartbeat_seconds = 1e300\n"),
    ("polling 1e300 s", {}, "polling_interval_seconds = 1e300\n"),
    ("settle 1e300 ms", {}, "settle_ms = 1e300\n"),
    ("batch size 2**64", {}, "batch_size = 18446744073709551616\n"),
    ("batch size 1e3", {"FSWATCH_SYNC_BATCH_SIZE": "1e3"}, ""),
    ("batch size 0", {}, "batch_size = 0\n"),
    ("batch size -1", {"FSWATCH_SYNC_BATCH_SIZE": "-1"}, ""),
    ("batch size 1.5", {}, "batch_size = 1.5\n"),
    ("max pending 10**30", {"FSWATCH_SYNC_MAX_PENDING_EVENTS": "1" + "0" * 30}, ""),
    ("fraction 1.5", {}, "max_delete_fraction = 1.5\n"),
    ("fraction nan", {"FSWATCH_SYNC_MAX_DELETE_FRACTION": "nan"}, ""),
    ("boolean 2", {}, "cleanup_orphan_apps = 2\n"),
    ("boolean maybe", {"FSWATCH_SYNC_CLEANUP_STUCK_TASKS": "maybe"}, ""),
    ("unknown key", {}, "intervall_seconds = 5\n"),
    ("schema not a table", {}, "schema = 5\n"),
    ("schema name a number", {}, "[schema]\napps_table = 5\n"),
    ("not TOML", {}, "root = \n"),
    ("TOML not UTF-8", {}, "\udcff = 1\n"),
    ("observer unknown", {"FSWATCH_SYNC_OBSERVER": "kqueue"}, ""),
    ("root marker escapes", {"FSWATCH_SYNC_ROOT_MARKER": "../x"}, ""),
    ("bad URL", {"FSWATCH_SYNC_DATABASE_URL": "not a url"}, ""),
    ("URL with unknown driver", {"FSWATCH_SYNC_DATABASE_URL": "oracle+nope://x"}, ""),
    ("http beyond loopback without token", {"FSWATCH_SYNC_HTTP": "0.0.0.0:8080"}, ""),
    ("http port 99999", {"FSWATCH_SYNC_HTTP": "127.0.0.1:99999"}, ""),
    ("log level", {"FSWATCH_SYNC_LOG_LEVEL": "LOUD"}, ""),
)


def run_cli(
    args: list[str], workdir: Path, env_extra: dict[str, str], toml: str, timeout: float
) -> tuple[int | None, str, str]:
    """Run ``python -m fswatch_sync ARGS`` in ``workdir``; (None, ...) if it outlived timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSWATCH_SYNC_",
                                                                    "MAINTENANCE_"))}
    if "database_url" not in toml:
        env["FSWATCH_SYNC_DATABASE_URL"] = f"sqlite:///{workdir / 'hostile.db'}"
    if toml:
        config = workdir / "hostile.toml"
        config.write_bytes(toml.encode("utf-8", "surrogateescape"))
        env["FSWATCH_SYNC_CONFIG"] = str(config)
    env.update(env_extra)
    process = subprocess.Popen(
        [sys.executable, "-m", "fswatch_sync", *args],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace")
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _verdict(label: str, command: str, code: int | None, err: str) -> str | None:
    lines = err.strip().splitlines()
    if code == 2 and len(lines) == 1 and lines[0].startswith("fswatch-sync: error:"):
        return None
    shown = (lines[-1] if lines else "<no stderr>")[:200]
    return f"{label} [{command}]: exit {code}, {len(lines)} stderr line(s), last: {shown}"


@contextmanager
def _patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("FSWATCH_SYNC_", "MAINTENANCE_")):
            del os.environ[key]
    os.environ.update(values)
    logger = logging.getLogger("fswatch_sync")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


def check_in_process(label: str, env: dict[str, str], toml: str, workdir: Path) -> str | None:
    """``fswatch-sync sweep --dry-run`` through :func:`cli.main` in this process."""
    from fswatch_sync import cli

    values = dict(env)
    if "database_url" not in toml:
        values.setdefault("FSWATCH_SYNC_DATABASE_URL", f"sqlite:///{workdir / 'hostile.db'}")
    if toml:
        config = workdir / "hostile.toml"
        config.write_bytes(toml.encode("utf-8", "surrogateescape"))
        values["FSWATCH_SYNC_CONFIG"] = str(config)
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    with _patched_environ(values), contextlib.redirect_stderr(err):
        os.chdir(workdir)
        try:
            code: int | None = cli.main(["sweep", "--dry-run"], out=out)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # a traceback is exactly what must not happen
            code, err = None, io.StringIO(f"{type(exc).__name__}: {exc}\nTraceback")
        finally:
            os.chdir(cwd)
    return _verdict(label, "sweep", code, err.getvalue())


def check_subprocess(
    label: str, env: dict[str, str], toml: str, workdir: Path, command: str
) -> str | None:
    """``fswatch-sync {command}`` as its own process (``run`` must stop before starting)."""
    index = [case[0] for case in HOSTILE_SETTINGS].index(label)
    case = workdir / f"case-{index}-{command}"
    case.mkdir(exist_ok=True)
    shutil.copy(workdir / "hostile.db", case / "hostile.db")
    (case / "generated" / "apps" / "m" / "app1").mkdir(parents=True, exist_ok=True)
    args = ["sweep", "--dry-run"] if command == "sweep" else ["run"]
    code, _out, err = run_cli(args, case, env, toml, timeout=15.0)
    return _verdict(label, command, code, err)


# The cases run end to end as their own ``run`` process in the quick rounds (all of them run so
# in the long rounds): one of each kind of hostility.
QUICK_SUBPROCESS_CASES = (
    "NUL in root (TOML)",
    "interval 1e300",
    "retention 1e300 days",
    "settle 1e300 ms",
    "batch size 2**64",
    "TOML not UTF-8",
    "interval nan",
    "root is a table",
)


def scenario_settings(workdir: Path, *, every_case_as_process: bool = False,
                      workers: int = 4) -> dict[str, Any]:
    """Every hostile setting: exit 2 and one line, never a traceback, never a started daemon.

    ``sweep --dry-run`` runs in this process for every case; ``run`` runs as its own process
    for :data:`QUICK_SUBPROCESS_CASES`, or for every case with ``every_case_as_process``.
    """
    (workdir / "generated" / "apps" / "m" / "app1").mkdir(parents=True, exist_ok=True)
    code, _out, err = run_cli(["init-db"], workdir, {}, "", timeout=30.0)
    assert code == 0, err
    failures = [
        problem
        for label, env, toml in HOSTILE_SETTINGS
        if (problem := check_in_process(label, env, toml, workdir)) is not None
    ]
    jobs = [(label, env, toml) for label, env, toml in HOSTILE_SETTINGS
            if every_case_as_process or label in QUICK_SUBPROCESS_CASES]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(
            lambda job: check_subprocess(job[0], job[1], job[2], workdir, "run"), jobs
        )
        failures += [problem for problem in results if problem is not None]
    assert not failures, "\n".join(failures)
    return {"in_process": len(HOSTILE_SETTINGS), "processes": len(jobs)}


# -- the scenarios, as the harness runs them ------------------------------------------------


@scenario(
    "hostile-tree-sweep",
    backends=("sqlite", "postgres", "mysql"),
    quick=2,
    long=40,
    summary="a tree of non-app names, non-UTF-8 names, symlink loops, dangling symlinks, symlinks"
    " to outside (app and model positions), a file and a FIFO where directories belong, huge"
    " numbers; rows with '..' or '/' in slugs and huge/negative numbers (round 1 fixed, later"
    " rounds add random extras): one sweep removes exactly the absent old rows, nothing outside"
    " the root is read (audit hook + inotify witnesses), and the outcome is the same with the"
    " outside directories removed",
    timeout_s=900,
)
def hostile_tree_sweep(run: Run) -> str:
    assert run.backend is not None
    rng = run.rng()
    removed = 0
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            seed = None if index == 0 else rng.randrange(2**31)
            result = scenario_sweep(url, run.workdir / f"round{index}", run.backend, seed)
            removed += int(result["removed"])
            remove_tree(run.workdir / f"round{index}")
    return (f"{run.rounds} trees x 2 variants: {removed} hostile rows removed per variant,"
            " every real app kept, no read outside the root, outside presence irrelevant")


@scenario(
    "hostile-tree-service",
    backends=("sqlite", "postgres"),
    quick=1,
    long=10,
    summary="the hostile tree under a running Service: its start-up sweep, then live hostile"
    " changes (non-UTF-8 dirs made and removed, a new model symlink to outside whose target"
    " changes, symlinks/FIFO/file removed, a rename to app11.bak, rm -rf) seen by the reactor:"
    " no thread dies, no error counted, only the right rows go, nothing outside read",
    timeout_s=600,
)
def hostile_tree_service(run: Run) -> str:
    assert run.backend is not None
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            scenario_service(url, run.workdir / f"round{index}", run.backend)
            remove_tree(run.workdir / f"round{index}")
    return f"{run.rounds} service run(s): start-up sweep + 24 live hostile changes each; all held"


@scenario(
    "hostile-root-path",
    backends=("sqlite", "postgres"),
    quick=1,
    long=5,
    summary="a root whose own path is not UTF-8 and holds a newline and spaces: a running"
    " Service starts (its heartbeat stores the root) and reacts to rm -rf; `sweep --json` works;"
    " the root gone, `sweep` refuses with exit 3 on one line, no traceback",
    timeout_s=300,
)
def hostile_root_path(run: Run) -> str:
    assert run.backend is not None
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            (run.workdir / f"round{index}").mkdir()
            scenario_root_path(url, run.workdir / f"round{index}")
    return f"{run.rounds} round(s): service, reactor, sweep and refusal all fine"


@scenario(
    "hostile-collation",
    backends=("sqlite", "postgres", "mysql"),
    quick=1,
    long=5,
    summary="model dirs m, M and 'm ' side by side (MariaDB's collation is case-blind and pads"
    " spaces): the sweep removes m/app3 (only look-alikes on disk); rm -rf of 'm /app1' and"
    " M/app1 never takes m/app1's row or task; M/app2 goes alone",
    timeout_s=300,
)
def hostile_collation(run: Run) -> str:
    assert run.backend is not None
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            scenario_collation(url, run.workdir / f"round{index}")
            remove_tree(run.workdir / f"round{index}")
    return f"{run.rounds} round(s): look-alike removals never took m/app1"


@scenario(
    "hostile-symlink-swap",
    quick=1,
    long=10,
    summary="another process swaps a model directory with a symlink to outside the root and"
    " back as fast as rename allows, while a process doing what the sweep and the reactor do"
    " to the disk (scan, re-check, root checks) runs without DAC capabilities against a mode"
    " 000 outside directory: the kernel refuses, and the witness records, any listing of or"
    " lookup in it",
    timeout_s=600,
)
def hostile_symlink_swap(run: Run) -> str:
    rounds = swaps = 0
    seconds = 2.0 if run.quick else 10.0
    for index in range(run.rounds):
        result = scenario_symlink_swap(run.workdir / f"round{index}", seconds)
        rounds += int(result["rounds"])
        swaps += int(result["swaps"])
    return (f"{run.rounds} x {seconds:g} s: {swaps} swaps during {rounds} rounds of scan,"
            " re-check and root checks; not one listing of or lookup in the outside directory")


@scenario(
    "hostile-settings",
    quick=1,
    long=1,
    summary=f"{len(HOSTILE_SETTINGS)} hostile settings (NUL in root/URL/marker, huge numbers,"
    " negative, inf/nan, wrong TOML types, non-UTF-8 TOML, unknown keys) through flags/env/TOML:"
    " `sweep` (in process) and `run` (as a process: quick rounds a sample, long rounds every"
    " case) stop with exit 2 and one line, never a traceback or a started daemon",
    timeout_s=900,
)
def hostile_settings(run: Run) -> str:
    for index in range(run.rounds):
        result = scenario_settings(run.workdir / f"round{index}",
                                   every_case_as_process=not run.quick)
    return (f"{result['in_process']} cases in process, {result['processes']} as `run` processes:"
            " all exit 2 with one line")


def now_utc() -> datetime:
    return datetime.now(UTC)


__all__ = [
    "HOSTILE_SETTINGS",
    "HostileTree",
    "build_tree",
    "check_in_process",
    "check_subprocess",
    "prepare_database",
    "scenario_service",
    "scenario_settings",
    "scenario_sweep",
]
