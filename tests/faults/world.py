"""A seeded population of apps — directory, row, tasks — and the invariants of issue 5.

The world remembers every app it created exactly as the database stored it (rows and tasks read
back after the insert), and which directories it took away. :meth:`World.check` then reads one
consistent snapshot of the database and holds every app to "fully handled or untouched":

* untouched: the row is there, byte for byte as seeded, every task as seeded, nothing journalled;
* fully handled: the directory was taken away, the row is gone, every active task is
  ``cancelled`` with ``completed_at`` and a message naming the app, terminal tasks are as seeded,
  and the journal holds exactly one ``app_removed`` entry whose before-image is the seeded row and
  exactly one ``task_cancelled`` entry per cancelled task (before-image, old and new status), all
  in the same batch (transaction).

Anything else — a row deleted while its directory is there, a task cancelled while its app keeps
its row, a removal without its journal, a journal without its removal — is a violation.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync import images
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.schemaconfig import SchemaConfig

HOST = default_host_metadata(SchemaConfig())
APPS = HOST.tables["generated_applications"]
TASKS = HOST.tables["analysis_tasks"]
ACTIVE = ("pending", "running")
SLUGS = ("openai_gpt-4", "anthropic_claude-3", "mistral_7b", "meta_llama-3")
EXPECTED_ACTIONS = frozenset({"app_removed", "task_cancelled"})
MAX_REPORTED = 8


def image(mapping: Any) -> dict[str, Any]:
    """A row as its journal before-image would show it (datetimes as ISO 8601)."""
    return {
        str(k): (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(mapping).items()
    }


def same_image(table: sa.Table, text: str, seeded: dict[str, Any]) -> bool:
    """Whether a journal before-image (rendered by whichever database wrote it) holds the seeded
    row's values."""
    return images.decode(table, text) == images.decode(table, json.dumps(seeded))


@dataclass
class App:
    key: AppKey
    row: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    removed: bool = False

    @property
    def active_tasks(self) -> list[str]:
        return [t for t, row in self.tasks.items() if row["status"] in ACTIVE]


@dataclass
class Snapshot:
    rows: dict[AppKey, dict[str, Any]]
    tasks: dict[str, dict[str, Any]]
    journal: list[dict[str, Any]]
    integrity: str | None = None


@dataclass
class Tally:
    handled: int = 0
    untouched: int = 0
    waiting: int = 0  # directory gone, row still there, nothing touched yet
    handled_keys: set[AppKey] = field(default_factory=set)


def read_snapshot(engine: Engine) -> Snapshot:
    """Rows, tasks and journal in one transaction (a consistent view on every backend)."""
    options: dict[str, Any] = {}
    if engine.dialect.name != "sqlite":
        options["isolation_level"] = "REPEATABLE READ"
    with engine.connect().execution_options(**options) as connection, connection.begin():
        rows = {
            AppKey(r.model_slug, int(r.app_number)): image(r._mapping)
            for r in connection.execute(sa.select(APPS))
        }
        tasks = {str(r.task_id): image(r._mapping) for r in connection.execute(sa.select(TASKS))}
        journal = [
            dict(r._mapping)
            for r in connection.execute(sa.select(journal_table).order_by(journal_table.c.id))
        ]
        integrity = None
        if engine.dialect.name == "sqlite":
            integrity = str(connection.exec_driver_sql("PRAGMA integrity_check").scalar())
    return Snapshot(rows, tasks, journal, integrity)


class World:
    """The apps a scenario created, on disk and in the database."""

    def __init__(self, root: Path, engine: Engine, trash: Path) -> None:
        self.root = root
        self.engine = engine
        self.trash = trash
        self.apps: dict[AppKey, App] = {}
        self._next: Counter[str] = Counter()
        self._moved = 0

    # -- creating --------------------------------------------------------------------------------

    def new_keys(self, slugs: Iterable[str], per_slug: int) -> list[AppKey]:
        keys = []
        for slug in slugs:
            for _ in range(per_slug):
                self._next[slug] += 1
                keys.append(AppKey(slug, self._next[slug]))
        return keys

    def seed(self, keys: list[AppKey], *, with_tasks: bool = True) -> None:
        """Directories first (a sweep must never see a row without its directory), then rows and
        tasks in one transaction, then read back exactly as stored."""
        if not keys:
            return
        now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        for key in keys:
            (self.path(key) / "src").mkdir(parents=True, exist_ok=True)
            (self.path(key) / "src" / "main.py").write_text("print('generated')\n")
        task_rows = []
        if with_tasks:
            for key in keys:
                stem = f"{key.model_slug}-{key.app_number}"
                base = {"target_model": key.model_slug, "target_app_number": key.app_number,
                        "error_message": None}
                task_rows += [
                    {**base, "task_id": f"{stem}-p", "status": "pending",
                     "created_at": now - timedelta(minutes=5), "started_at": None,
                     "completed_at": None},
                    {**base, "task_id": f"{stem}-r", "status": "running",
                     "created_at": now - timedelta(minutes=5),
                     "started_at": now - timedelta(minutes=1), "completed_at": None},
                    {**base, "task_id": f"{stem}-c", "status": "completed",
                     "created_at": now - timedelta(minutes=30),
                     "started_at": now - timedelta(minutes=29),
                     "completed_at": now - timedelta(minutes=20)},
                ]
        with self.engine.begin() as connection:
            connection.execute(
                sa.insert(APPS),
                [{"model_slug": k.model_slug, "app_number": k.app_number,
                  "created_at": now - timedelta(hours=1)} for k in keys],
            )
            if task_rows:
                connection.execute(sa.insert(TASKS), task_rows)
        wanted = set(keys)
        slugs = sorted({k.model_slug for k in keys})
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(APPS).where(APPS.c.model_slug.in_(slugs))).all()
            tasks = connection.execute(
                sa.select(TASKS).where(TASKS.c.target_model.in_(slugs))
            ).all()
        for row in rows:
            key = AppKey(row.model_slug, int(row.app_number))
            if key in wanted:
                self.apps[key] = App(key, image(row._mapping), {})
        for task in tasks:
            key = AppKey(task.target_model, int(task.target_app_number))
            if key in wanted:
                self.apps[key].tasks[str(task.task_id)] = image(task._mapping)

    # -- taking away -----------------------------------------------------------------------------

    def path(self, key: AppKey) -> Path:
        return self.root / key.model_slug / f"app{key.app_number}"

    def alive(self) -> list[AppKey]:
        return sorted(k for k, app in self.apps.items() if not app.removed)

    def alive_by_slug(self) -> dict[str, list[AppKey]]:
        by_slug: dict[str, list[AppKey]] = {}
        for key in self.alive():
            by_slug.setdefault(key.model_slug, []).append(key)
        return by_slug

    def remove_app(self, key: AppKey, how: str = "rmtree") -> None:
        """Take one app directory away: ``rmtree``, ``move`` (out of the root) or ``rename``
        (to a name that is not ``app{N}``)."""
        path = self.path(key)
        if how == "rmtree":
            shutil.rmtree(path)
        elif how == "move":
            self._moved += 1
            self.trash.mkdir(parents=True, exist_ok=True)
            path.rename(self.trash / f"{self._moved}-{key.model_slug}-app{key.app_number}")
        elif how == "rename":
            path.rename(path.with_name(f"old-app{key.app_number}"))
        else:
            raise ValueError(how)
        self.apps[key].removed = True

    def remove_model(self, slug: str, how: str = "rmtree") -> list[AppKey]:
        path = self.root / slug
        if how == "rmtree":
            shutil.rmtree(path)
        else:
            self._moved += 1
            self.trash.mkdir(parents=True, exist_ok=True)
            path.rename(self.trash / f"{self._moved}-{slug}")
        keys = [k for k, app in self.apps.items() if k.model_slug == slug and not app.removed]
        for key in keys:
            self.apps[key].removed = True
        return keys

    # -- checking --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return read_snapshot(self.engine)

    def check(self, snap: Snapshot, *, settled: bool = False) -> Tally:
        """Every app fully handled or untouched; with ``settled``, the database matches the disk.

        Raises AssertionError listing the first violations.
        """
        problems: list[str] = []
        tally = Tally()
        if snap.integrity not in (None, "ok"):
            problems.append(f"SQLite integrity_check: {snap.integrity}")
        removed_entries: dict[AppKey, list[dict[str, Any]]] = {}
        cancel_entries: dict[str, list[dict[str, Any]]] = {}
        for entry in snap.journal:
            if entry["action"] not in EXPECTED_ACTIONS:
                problems.append(f"unexpected journal action {entry['action']}: {entry}")
                continue
            if entry["action"] == "app_removed":
                key = AppKey(entry["model_slug"], int(entry["app_number"]))
                removed_entries.setdefault(key, []).append(entry)
            else:
                task_id = str(json.loads(entry["before_image"])["task_id"])
                cancel_entries.setdefault(task_id, []).append(entry)
        unknown = set(removed_entries) - set(self.apps)
        if unknown:
            problems.append(f"journal names apps never seeded: {sorted(unknown)[:3]}")
        extra_rows = set(snap.rows) - set(self.apps)
        if extra_rows:
            problems.append(f"rows nobody seeded: {sorted(extra_rows)[:3]}")
        for key, app in sorted(self.apps.items()):
            before = len(problems)
            if key in snap.rows:
                self._check_untouched(app, snap, removed_entries, cancel_entries, problems)
                if len(problems) == before:
                    if app.removed:
                        tally.waiting += 1
                        if settled:
                            problems.append(f"{key}: directory gone but its row is still there")
                    else:
                        tally.untouched += 1
            else:
                self._check_handled(app, snap, removed_entries, cancel_entries, problems)
                if len(problems) == before:
                    tally.handled += 1
                    tally.handled_keys.add(key)
        if problems:
            shown = "; ".join(problems[:MAX_REPORTED])
            hidden = len(problems) - MAX_REPORTED
            more = f" (+{hidden} more)" if hidden > 0 else ""
            raise AssertionError(f"{len(problems)} invariant violation(s): {shown}{more}")
        return tally

    def _check_untouched(
        self,
        app: App,
        snap: Snapshot,
        removed_entries: dict[AppKey, list[dict[str, Any]]],
        cancel_entries: dict[str, list[dict[str, Any]]],
        problems: list[str],
    ) -> None:
        key = app.key
        if snap.rows[key] != app.row:
            problems.append(f"{key}: row changed: {snap.rows[key]} != {app.row}")
        if key in removed_entries:
            problems.append(f"{key}: journalled as removed but its row is there")
        for task_id, seeded in app.tasks.items():
            now = snap.tasks.get(task_id)
            if now != seeded:
                problems.append(f"{key}: task {task_id} changed while the app kept its row: {now}")
            if task_id in cancel_entries:
                problems.append(f"{key}: task {task_id} journalled as cancelled, app kept its row")

    def _check_handled(
        self,
        app: App,
        snap: Snapshot,
        removed_entries: dict[AppKey, list[dict[str, Any]]],
        cancel_entries: dict[str, list[dict[str, Any]]],
        problems: list[str],
    ) -> None:
        key = app.key
        if not app.removed:
            problems.append(f"{key}: WRONG REMOVAL: row deleted while its directory is there")
        entries = removed_entries.get(key, [])
        if len(entries) != 1:
            problems.append(f"{key}: row gone with {len(entries)} app_removed journal entries")
            return
        entry = entries[0]
        if not same_image(APPS, entry["before_image"], app.row):
            problems.append(f"{key}: before-image {entry['before_image']} != seeded {app.row}")
        for task_id, seeded in app.tasks.items():
            now = snap.tasks.get(task_id)
            if now is None:
                problems.append(f"{key}: task {task_id} deleted")
                continue
            if seeded["status"] not in ACTIVE:
                if now != seeded:
                    problems.append(f"{key}: terminal task {task_id} changed: {now}")
                if task_id in cancel_entries:
                    problems.append(f"{key}: terminal task {task_id} journalled as cancelled")
                continue
            if now["status"] != "cancelled" or now["completed_at"] is None:
                problems.append(f"{key}: HALF-DONE: row gone, task {task_id} is {now['status']}")
            message = now["error_message"] or ""
            # The raw slug: str(key) is the display form, with control characters escaped.
            named = f"{key.model_slug}/app{key.app_number}"
            if "gone" not in message or named not in message:
                problems.append(f"{key}: task {task_id} message {message!r}")
            unchanged = {k: v for k, v in now.items()
                         if k not in ("status", "completed_at", "error_message")}
            if unchanged != {k: v for k, v in seeded.items() if k in unchanged}:
                problems.append(f"{key}: task {task_id} changed beyond its status: {now}")
            cancels = cancel_entries.get(task_id, [])
            if len(cancels) != 1:
                problems.append(f"{key}: task {task_id} has {len(cancels)} task_cancelled entries")
                continue
            cancel = cancels[0]
            if (cancel["old_status"], cancel["new_status"]) != (seeded["status"], "cancelled"):
                problems.append(f"{key}: task {task_id} journalled {cancel['old_status']}->"
                                f"{cancel['new_status']}")
            if not same_image(TASKS, cancel["before_image"], seeded):
                problems.append(f"{key}: task {task_id} before-image differs from the seeded row")
            if cancel["batch_id"] != entry["batch_id"]:
                problems.append(f"{key}: task {task_id} cancelled in another transaction")
