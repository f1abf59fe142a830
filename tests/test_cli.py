"""The sweep's guard (through Sweeper and through the command line) and the CLI's commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.errors import SweepRefused
from fswatch_sync.layout import AppKey
from fswatch_sync.records import Lease
from fswatch_sync.schema import journal_table
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.sweep_plan import guard
from fswatch_sync.sweep_report import SweepReport

REPORT_KEYS = ("orphan_apps", "orphan_tasks", "stuck_tasks", "old_tasks")
CONSOLE_SCRIPT = Path(sys.executable).parent / "fswatch-sync"


# -- helpers ------------------------------------------------------------------------------------


def seed(
    store: Store, root: Path, now: datetime, *, rows: int, missing: int, young: int = 0
) -> list[AppKey]:
    """``rows`` old app rows (plus ``young`` ones inside the grace), each with a pending task;
    the first ``missing`` old ones (and every young one) have no directory. Returns the keys."""
    keys = [AppKey("model", n) for n in range(1, rows + young + 1)]
    for index, key in enumerate(keys):
        path = root / key.model_slug / f"app{key.app_number}"
        if missing <= index < rows:
            path.mkdir(parents=True, exist_ok=True)
        elif path.exists():
            shutil.rmtree(path)
    host = store.host
    with store.engine.begin() as connection:
        connection.execute(sa.delete(host.tasks))
        connection.execute(sa.delete(host.apps))
        connection.execute(
            sa.insert(host.apps),
            [
                {
                    "model_slug": key.model_slug,
                    "app_number": key.app_number,
                    "created_at": db.to_db_time(
                        now - (timedelta(days=1) if i < rows else timedelta(minutes=1))
                    ),
                }
                for i, key in enumerate(keys)
            ],
        )
        connection.execute(
            sa.insert(host.tasks),
            [
                {
                    "task_id": f"task-{key.app_number}",
                    "target_model": key.model_slug,
                    "target_app_number": key.app_number,
                    "status": "pending",
                    "created_at": db.to_db_time(now - timedelta(minutes=1)),
                }
                for key in keys
            ],
        )
    return keys


def host_state(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """The host tables and the journal, row by row."""
    store = Store(engine)
    state: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for table in (store.host.apps, store.host.tasks, journal_table):
            pk = list(table.primary_key.columns)
            rows = connection.execute(sa.select(table).order_by(*pk))
            state[table.name] = [tuple(row) for row in rows]
    return state


def app_count(engine: Engine) -> int:
    host = Store(engine).host
    with engine.connect() as connection:
        count = connection.execute(sa.select(sa.func.count()).select_from(host.apps))
        return int(count.scalar_one())


def sweeper(store: Store, root: Path, url: str, **overrides: Any) -> Sweeper:
    settings = Settings(root=root, database_url=url, **overrides)
    return Sweeper(store, settings, instance_id="test")


@pytest.fixture
def store(engine: Engine) -> Store:
    created = Store(engine, batch_size=3)
    created.init_db()
    return created


# -- the guard, pure ----------------------------------------------------------------------------


def test_guard_rules() -> None:
    def check(**kwargs: Any) -> str | None:
        values: dict[str, Any] = {
            "root_problem": None, "rows": 10, "orphans": 5, "max_fraction": 0.5,
            "force": False,
        }
        values.update(kwargs)
        return guard(**values)

    assert check() is None  # exactly the fraction is allowed
    assert check(orphans=6) is not None
    assert check(orphans=6, force=True) is None
    assert check(orphans=6, max_fraction=0.7) is None
    assert check(orphans=1, max_fraction=0.0) is not None
    assert check(orphans=0, max_fraction=0.0) is None
    assert check(root_problem="root-missing") is not None
    assert check(root_problem="root-missing", force=True) is not None
    # An empty root (treehealth's verdict) is never passed by --force: only --allow-empty-root,
    # which treehealth applies before the guard.
    assert check(root_problem="root-empty", orphans=10) is not None
    assert check(root_problem="root-empty", orphans=10, force=True) is not None
    # One removal is not a mass deletion (the last app), unless the fraction is 0.
    assert check(rows=1, orphans=1) is None
    assert check(rows=1, orphans=1, max_fraction=0.0) is not None
    assert check(rows=3, orphans=2) is not None


# -- the guard, through Sweeper -----------------------------------------------------------------


def test_guard_root_missing_refused_even_forced(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    seed(store, apps_root, now, rows=10, missing=0)
    gone = apps_root.parent / "unmounted"
    before = host_state(store.engine)
    for force in (False, True):
        with pytest.raises(SweepRefused, match="missing"):
            sweeper(store, gone, database_url).run(now=now, force=force)
        with pytest.raises(SweepRefused):
            sweeper(store, gone, database_url).run(now=now, force=force, dry_run=True)
    assert host_state(store.engine) == before


def test_guard_marker_missing_is_a_missing_root(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    seed(store, apps_root, now, rows=10, missing=2)
    before = host_state(store.engine)
    with pytest.raises(SweepRefused):
        sweeper(store, apps_root, database_url, root_marker=".mounted").run(now=now, force=True)
    assert host_state(store.engine) == before
    (apps_root / ".mounted").write_text("")
    report = sweeper(store, apps_root, database_url, root_marker=".mounted").run(now=now)
    assert report.orphan_apps == 2


def test_guard_empty_root(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    seed(store, apps_root, now, rows=10, missing=10)
    (apps_root / "model").mkdir(exist_ok=True)  # model directories but no app directory
    before = host_state(store.engine)
    with pytest.raises(SweepRefused, match="no app directory"):
        sweeper(store, apps_root, database_url, max_delete_fraction=1.0).run(now=now)
    assert host_state(store.engine) == before
    with pytest.raises(SweepRefused, match="no app directory"):  # --force passes no empty root
        sweeper(store, apps_root, database_url).run(now=now, force=True)
    assert host_state(store.engine) == before
    report = sweeper(store, apps_root, database_url).run(
        now=now, force=True, allow_empty_root=True
    )
    assert (report.orphan_apps, report.orphan_tasks) == (10, 10)
    assert app_count(store.engine) == 0


def test_guard_fraction(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    seed(store, apps_root, now, rows=10, missing=6)
    before = host_state(store.engine)
    with pytest.raises(SweepRefused, match="60%"):
        sweeper(store, apps_root, database_url).run(now=now)
    with pytest.raises(SweepRefused):
        sweeper(store, apps_root, database_url).run(now=now, dry_run=True)
    assert host_state(store.engine) == before

    report = sweeper(store, apps_root, database_url, max_delete_fraction=0.7).run(now=now)
    assert (report.orphan_apps, report.orphan_tasks) == (6, 6)
    assert app_count(store.engine) == 4

    seed(store, apps_root, now, rows=10, missing=6)
    report = sweeper(store, apps_root, database_url).run(now=now, force=True)
    assert (report.orphan_apps, report.orphan_tasks) == (6, 6)
    assert app_count(store.engine) == 4


def test_guard_exact_fraction_and_young_rows(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    # 5 of 10 old rows missing: exactly the allowed half. 20 young rows without directories
    # are inside the grace: they are neither orphans nor counted against the fraction.
    seed(store, apps_root, now, rows=10, missing=5, young=20)
    report = sweeper(store, apps_root, database_url).run(now=now)
    assert report.orphan_apps == 5
    assert app_count(store.engine) == 25


# -- the guard, through the command line ---------------------------------------------------------


def _environ(database_url: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }
    env["FSWATCH_SYNC_DATABASE_URL"] = database_url
    return env


def cli(
    args: list[str], database_url: str, cwd: Path, *, module: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fswatch_sync"] if module else [str(CONSOLE_SCRIPT)]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=_environ(database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def sweep_json(
    args: list[str], database_url: str, root: Path, now: datetime
) -> tuple[int, dict[str, Any], str]:
    result = cli(
        ["sweep", "--json", "--root", str(root), "--now", now.isoformat(), *args],
        database_url,
        root.parent,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    for key in REPORT_KEYS:
        assert type(report[key]) is int, key
    assert type(report["dry_run"]) is bool
    assert "Traceback" not in result.stderr
    return result.returncode, report, result.stderr


def test_cli_guard(store: Store, database_url: str, apps_root: Path, now: datetime) -> None:
    engine = store.engine
    seed(store, apps_root, now, rows=10, missing=0)

    # Root missing: refused, even forced (unforced and dry runs: see the Sweeper tests above).
    before = host_state(engine)
    gone = apps_root.parent / "unmounted"
    code, report, stderr = sweep_json(["--force"], database_url, gone, now)
    assert code == 3, stderr
    assert report["dry_run"] is False
    assert [report[k] for k in REPORT_KEYS] == [0, 0, 0, 0]
    assert f"{gone}: the root is missing" in stderr
    assert host_state(engine) == before

    # Root present but empty while rows exist: refused, --force too; --allow-empty-root
    # proceeds (every row goes: it says so, so the fraction does not ask again).
    empty = apps_root.parent / "empty"
    empty.mkdir()
    code, report, stderr = sweep_json([], database_url, empty, now)
    assert code == 3, stderr
    assert host_state(engine) == before
    code, report, stderr = sweep_json(["--force"], database_url, empty, now)
    assert code == 3, stderr
    assert "--allow-empty-root" in stderr
    assert host_state(engine) == before
    code, report, stderr = sweep_json(["--allow-empty-root"], database_url, empty, now)
    assert code == 0, stderr
    assert (report["orphan_apps"], report["orphan_tasks"]) == (10, 10)
    assert app_count(engine) == 0

    # 60 % missing: refused (dry run too); --max-delete-fraction 0.7 proceeds; --force proceeds.
    seed(store, apps_root, now, rows=10, missing=6)
    before = host_state(engine)
    code, report, stderr = sweep_json([], database_url, apps_root, now)
    assert (code, report["dry_run"]) == (3, False), stderr
    assert host_state(engine) == before
    code, report, stderr = sweep_json(
        ["--dry-run", "--max-delete-fraction", "0.7"], database_url, apps_root, now
    )
    assert (code, report["dry_run"]) == (0, True), stderr
    assert (report["orphan_apps"], report["orphan_tasks"]) == (6, 6)
    assert host_state(engine) == before
    code, report, stderr = sweep_json(
        ["--max-delete-fraction", "0.7"], database_url, apps_root, now
    )
    assert code == 0, stderr
    assert (report["orphan_apps"], report["orphan_tasks"]) == (6, 6)
    assert app_count(engine) == 4

    seed(store, apps_root, now, rows=10, missing=6)
    code, report, stderr = sweep_json(["--force"], database_url, apps_root, now)
    assert code == 0, stderr
    assert (report["dry_run"], report["orphan_apps"], report["orphan_tasks"]) == (False, 6, 6)
    assert app_count(engine) == 4


# -- other commands -----------------------------------------------------------------------------


def test_init_db_is_idempotent(database_url: str, tmp_path: Path) -> None:
    first = cli(["init-db"], database_url, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "generated_applications" in first.stdout and "analysis_tasks" in first.stdout
    engine = db.create_engine(database_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
        assert {"generated_applications", "analysis_tasks", "fswatch_sync_journal"} <= tables
        with engine.begin() as connection:
            connection.execute(
                sa.text("INSERT INTO generated_applications (model_slug, app_number)"
                        " VALUES ('m', 1)")
            )
        second = cli(["init-db"], database_url, tmp_path)
        assert second.returncode == 0, second.stderr
        assert "already exist" in second.stdout
        assert set(sa.inspect(engine).get_table_names()) == tables
        assert app_count(engine) == 1  # nothing dropped or recreated
    finally:
        engine.dispose()


def test_status_journal_and_human_output(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    seed(store, apps_root, now, rows=10, missing=2)
    cwd = apps_root.parent
    human = cli(["sweep", "--root", str(apps_root), "--now", now.isoformat()], database_url, cwd)
    assert human.returncode == 0, human.stderr
    assert "orphan apps" in human.stdout and "Traceback" not in human.stderr

    status = cli(["status", "--json", "--root", str(apps_root)], database_url, cwd)
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    assert parsed["sweeps"][0]["outcome"] == "ok"
    assert (parsed["sweeps"][0]["orphan_apps"], parsed["sweeps"][0]["orphan_tasks"]) == (2, 2)
    assert "password" not in status.stdout

    status_human = cli(["status", "--root", str(apps_root)], database_url, cwd)
    assert status_human.returncode == 0, status_human.stderr
    assert "recent sweeps" in status_human.stdout

    journal = cli(["journal", "--json", "--root", str(apps_root)], database_url, cwd)
    assert journal.returncode == 0, journal.stderr
    entries = json.loads(journal.stdout)
    assert sorted(e["action"] for e in entries) == ["app_removed"] * 2 + ["task_cancelled"] * 2
    only = cli(
        ["journal", "--json", "--action", "app_removed", "--root", str(apps_root)],
        database_url, cwd,
    )
    assert {(e["model_slug"], e["app_number"]) for e in json.loads(only.stdout)} == {
        ("model", 1), ("model", 2)
    }
    journal_human = cli(["journal", "--root", str(apps_root)], database_url, cwd)
    assert journal_human.returncode == 0
    assert "app_removed" in journal_human.stdout


def test_a_held_lease_fails_the_sweep_in_one_line(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    seed(store, apps_root, now, rows=4, missing=1)
    before = host_state(store.engine)
    other = Lease(store.engine, "other-instance", duration_seconds=60)
    assert other.try_acquire()
    result = cli(["sweep", "--json", "--root", str(apps_root)], database_url, apps_root.parent)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "other-instance" in result.stderr
    assert host_state(store.engine) == before


@pytest.mark.parametrize("backend", ["sqlite"])
def test_python_m_and_console_script_are_the_same_program(
    store: Store, database_url: str, apps_root: Path, now: datetime
) -> None:
    assert CONSOLE_SCRIPT.exists(), "the package is installed with its console script"
    seed(store, apps_root, now, rows=4, missing=1)
    cwd = apps_root.parent
    for args in (
        ["--help"],
        ["sweep", "--dry-run", "--json", "--root", str(apps_root), "--now", now.isoformat()],
    ):
        by_module = cli(args, database_url, cwd, module=True)
        by_script = cli(args, database_url, cwd, module=False)
        assert by_module.returncode == by_script.returncode, args
        if "--json" in args:
            a, b = json.loads(by_module.stdout), json.loads(by_script.stdout)
            for volatile in ("duration_seconds",):
                a.pop(volatile), b.pop(volatile)
            assert a == b
            assert a["orphan_apps"] == 1
        else:
            assert by_module.stdout == by_script.stdout, args
            assert by_module.stderr == by_script.stderr, args


def test_sweep_report_json_keys() -> None:
    data = SweepReport(dry_run=True).to_dict()
    assert all(type(data[key]) is int for key in REPORT_KEYS)
    assert data["dry_run"] is True
    json.dumps(data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("openai_gpt-4/app123", ("openai_gpt-4", 123)),
        ("m/app0", ("m", 0)),
        ("m/app01", None),
        ("m/app\u0661", None),  # a Unicode digit is not a plain decimal
        ("m/app", None),
        ("app1", None),
        ("../app1", None),
        ("a/b/app1", None),
    ],
)
def test_journal_app_selection_uses_the_layout_rules(
    text: str, expected: tuple[str, int] | None
) -> None:
    from fswatch_sync.cli_args import build_parser, selection_from
    from fswatch_sync.errors import SettingsError

    args = build_parser().parse_args(["journal", "--app", text])
    if expected is None:
        with pytest.raises(SettingsError, match="--app"):
            selection_from(args)
    else:
        assert selection_from(args).app == expected
