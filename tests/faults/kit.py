"""Shared by the race, overflow and hostile-input fault scenarios.

Everything here works against real things: a real database (seeded and observed through an
engine of its own, never the tool's), real directories, and two independent witnesses of what
the process reads from the disk:

* :class:`ReadAudit` — a CPython audit hook that sees every ``open``, ``os.scandir`` and
  ``os.listdir`` made by any thread of this process, and a wrapper of ``os.stat``/``os.lstat``
  that sees in which directory each path is looked up, so a scan that strays outside the root
  is caught even when the code swallows the error it would get;
* :class:`InotifyAccessWatch` — the kernel's own account: an inotify watch with ``IN_OPEN`` and
  ``IN_ACCESS`` on the directories that must never be read, which also sees what C code does.

Nothing sleeps to wait for an outcome: ``helpers.wait_until`` polls with a deadline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import json
import os
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import instances_table, journal_table, leases_table, sweeps_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.store import Store

HOST = default_host_metadata(SchemaConfig())
APPS = HOST.tables["generated_applications"]
TASKS = HOST.tables["analysis_tasks"]
ACTIVE = ("pending", "running")
TERMINAL = ("completed", "failed", "cancelled")


def prepare_database(database_url: str) -> None:
    """The tool's tables and the default host tables, as ``fswatch-sync init-db`` makes them."""
    engine = db.create_engine(database_url)
    try:
        Store(engine).init_db()
    finally:
        engine.dispose()


def clear_rows(engine: Engine) -> None:
    """Empty every table the scenarios touch (between property-based examples)."""
    with engine.begin() as connection:
        for table in (TASKS, APPS, journal_table, sweeps_table, leases_table, instances_table):
            connection.execute(sa.delete(table))


@contextmanager
def probe_engine(database_url: str) -> Iterator[Engine]:
    """A separate engine to seed and observe: what another process would see."""
    engine = sa.create_engine(
        database_url, **({"connect_args": {"timeout": 30}} if database_url.startswith(
            "sqlite") else {})
    )
    try:
        yield engine
    finally:
        engine.dispose()


def insert_apps(engine: Engine, rows: Iterable[tuple[AppKey, datetime | None]]) -> None:
    values = [
        {"model_slug": key.model_slug, "app_number": key.app_number,
         "created_at": db.to_db_time(created) if created else None}
        for key, created in rows
    ]
    if values:
        with engine.begin() as connection:
            connection.execute(sa.insert(APPS), values)


@dataclasses.dataclass(frozen=True)
class TaskSeed:
    task_id: str
    key: AppKey
    status: str
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None


def insert_tasks(engine: Engine, tasks: Sequence[TaskSeed]) -> dict[str, int]:
    """Insert the tasks; return their primary keys by task_id."""
    if tasks:
        with engine.begin() as connection:
            connection.execute(
                sa.insert(TASKS),
                [
                    {
                        "task_id": t.task_id,
                        "target_model": t.key.model_slug,
                        "target_app_number": t.key.app_number,
                        "status": t.status,
                        "created_at": db.to_db_time(t.created_at),
                        "started_at": db.to_db_time(t.started_at) if t.started_at else None,
                        "completed_at": db.to_db_time(t.completed_at) if t.completed_at else None,
                    }
                    for t in tasks
                ],
            )
    with engine.connect() as connection:
        return {
            str(task_id): int(pk)
            for pk, task_id in connection.execute(sa.select(TASKS.c.id, TASKS.c.task_id))
        }


def app_keys(engine: Engine) -> set[AppKey]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(APPS.c.model_slug, APPS.c.app_number)).all()
    return {AppKey(str(slug), int(number)) for slug, number in rows}


def task_rows(engine: Engine) -> dict[int, dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(TASKS)).all()
    return {int(row.id): dict(row._mapping) for row in rows}


def journal_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(journal_table).order_by(journal_table.c.id)).all()
    return [dict(row._mapping) for row in rows]


def journal_task_pk(entry: dict[str, Any]) -> int:
    """The task's primary key from a journal entry's ``row_key`` (a JSON list of pk values)."""
    values = json.loads(entry["row_key"])
    return int(values[0])


def sweep_rows(engine: Engine) -> list[dict[str, Any]]:
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(sweeps_table).order_by(sweeps_table.c.id)).all()
    except sa.exc.OperationalError:  # tables not there yet (a daemon still starting)
        return []
    return [dict(row._mapping) for row in rows]


def make_dirs(root: Path, keys: Iterable[AppKey]) -> None:
    for key in keys:
        (root / key.model_slug / f"app{key.app_number}" / "src").mkdir(parents=True, exist_ok=True)


def remove_tree(path: str | os.PathLike[str] | bytes) -> None:
    """``rm -rf`` without following symlinks (works with bytes paths too)."""
    target = os.fsencode(path)
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(target)
        return
    for entry in os.scandir(target):
        remove_tree(entry.path)
    os.rmdir(target)


# -- witnesses of reading ----------------------------------------------------------------------

_AUDITED = frozenset({"open", "os.scandir", "os.listdir"})
_audit_lock = threading.Lock()
_audit_targets: list[ReadAudit] = []
_audit_installed = False
_in_hook = threading.local()
_ORIGINAL_STAT, _ORIGINAL_LSTAT = os.stat, os.lstat


def _stat_hook(original: Callable[..., os.stat_result], event: str) -> Callable[..., Any]:
    """``os.stat``/``os.lstat`` recording the directory each path is looked up in.

    A stat has no audit event, yet ``lstat(root/evil/app1)`` with ``evil`` a symlink looks
    ``app1`` up in the directory outside: that is a read outside the root too.
    """

    def hooked(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if (
            _audit_targets
            and not getattr(_in_hook, "active", False)
            and kwargs.get("dir_fd") is None
            and isinstance(path, str | bytes | os.PathLike)
        ):
            _in_hook.active = True
            try:
                text = os.fsdecode(path)
                looked_in = os.path.dirname(os.path.abspath(text))
                for audit in list(_audit_targets):
                    audit.observe(f"{event} (lookup in {looked_in})", looked_in)
                    if event == "os.stat":
                        audit.observe(event, text)
            finally:
                _in_hook.active = False
        return original(path, *args, **kwargs)

    return hooked


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in _AUDITED or not _audit_targets:
        return
    path = args[0] if args else None
    if isinstance(path, int) or path is None:
        return
    flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
    nofollow = bool(flags & os.O_NOFOLLOW)
    for audit in list(_audit_targets):
        audit.observe(event, path, follow_last=not nofollow)


class ReadAudit:
    """Records every open/scandir/listdir of a path that resolves inside ``forbidden`` dirs.

    Installed once per process (audit hooks cannot be removed); active only inside ``with``.
    Paths are resolved with ``realpath`` so that a symlink through which code reads counts as a
    read of its target.
    """

    def __init__(self, forbidden: Iterable[Path]) -> None:
        self.forbidden = [os.path.realpath(p) for p in forbidden]
        self.hits: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._ignored_threads: set[int] = set()

    @contextmanager
    def ignoring_this_thread(self) -> Iterator[None]:
        """The test's own deliberate reads outside the root (making or removing the outside
        directories) are not the tool's: ignore this thread's reads meanwhile."""
        ident = threading.get_ident()
        self._ignored_threads.add(ident)
        try:
            yield
        finally:
            self._ignored_threads.discard(ident)

    def observe(self, event: str, path: object, *, follow_last: bool = True) -> None:
        """Record ``event`` if ``path`` resolves inside a forbidden directory (its last part
        not followed when ``follow_last`` is False: an ``O_NOFOLLOW`` open of a symlink reads
        nothing behind it)."""
        if threading.get_ident() in self._ignored_threads:
            return
        reentered = getattr(_in_hook, "active", False)
        _in_hook.active = True
        try:
            text = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else None
            if text is None:
                return
            if follow_last:
                resolved = os.path.realpath(text)
            else:
                absolute = os.path.abspath(text)
                resolved = os.path.join(
                    os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute)
                )
        except (OSError, ValueError, TypeError):
            return
        finally:
            _in_hook.active = reentered
        for forbidden in self.forbidden:
            if resolved == forbidden or resolved.startswith(forbidden.rstrip("/") + "/"):
                with self._lock:
                    self.hits.append((event, text))
                return

    def __enter__(self) -> ReadAudit:
        global _audit_installed
        with _audit_lock:
            if not _audit_installed:
                sys.addaudithook(_audit_hook)
                _audit_installed = True
            if not _audit_targets:
                os.stat = _stat_hook(_ORIGINAL_STAT, "os.stat")
                os.lstat = _stat_hook(_ORIGINAL_LSTAT, "os.lstat")
            _audit_targets.append(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        with _audit_lock:
            _audit_targets.remove(self)
            if not _audit_targets:
                os.stat, os.lstat = _ORIGINAL_STAT, _ORIGINAL_LSTAT


_IN_ACCESS, _IN_OPEN, _IN_NONBLOCK = 0x1, 0x20, 0o4000
_EVENT_HEADER = struct.Struct("iIII")


class InotifyAccessWatch:
    """The kernel's witness: IN_OPEN/IN_ACCESS on directories (and what is directly in them).

    Any process or thread that opens or lists one of the watched directories, or opens a file
    directly inside one, leaves an event here.
    """

    def __init__(self, directories: Iterable[Path]) -> None:
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(libc_name, use_errno=True)
        self._fd = self._libc.inotify_init1(_IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._names: dict[int, str] = {}
        for directory in directories:
            wd = self._libc.inotify_add_watch(
                self._fd, os.fsencode(directory), _IN_OPEN | _IN_ACCESS
            )
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"cannot watch {directory}")
            self._names[wd] = str(directory)

    def events(self) -> list[str]:
        """Every access seen so far, as ``directory[/name]: kind``."""
        seen: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return seen
            except OSError as exc:  # pragma: no cover - closed fd
                if exc.errno == errno.EBADF:
                    return seen
                raise
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                kind = "open" if mask & _IN_OPEN else "access"
                where = self._names.get(wd, "?")
                seen.append(f"{where}/{os.fsdecode(name)}: {kind}" if name else f"{where}: {kind}")

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> InotifyAccessWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
