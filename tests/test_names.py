"""Issue 11, points 1, 2 (wide values) and 11: every name the filesystem can hold is a slug, any
value a host column can hold is removable, and no name can forge a line of output.

A model directory called ``~user`` or ``a\\b`` is as real as ``openai_gpt-4``: while it exists its
apps are present (the sweep keeps them), and when one of its app directories goes, the reactor
removes the row. A slug longer than a directory name can be (a host's column may be wider than
NAME_MAX) and an app number past 32 bits are removed like any other, by the sweep and by the
reactor, and journalled. Run on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import helpers
import pytest
import sqlalchemy as sa
from helpers import (
    SLUG,
    add_app_row,
    app_keys,
    app_state,
    has_row,
    init_database,
    make_settings,
    probe_engine,
    running_service,
    seed_app,
    wait_until,
)
from sqlalchemy import BigInteger, Column, DateTime, Integer, String, Table, Text
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.hints import AppGone
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.text import printable

# Legal directory names an older slug rule refused (``~``, ``\``) or that carry what a printed
# line must not (a newline, a tab, a terminal escape). None differs from another only in case or
# trailing spaces, which MariaDB's default collation would fold together.
LEGAL_NAMES = (
    "~user",
    "~",
    "a\\b",
    "\\",
    "with space",
    "модель-1",
    "new\nline",
    "tab\tand\x1b[31mescape",
)
FORGED = "2026-01-01 00:00:00,000 INFO fswatch_sync.reactor: removed 0 app row(s)"
NEWLINE_SLUG = f"evil\n{FORGED}"

# The longest directory name Linux allows, and a slug no directory can ever carry.
NAME_MAX_SLUG = "n" * 255
TOO_LONG_SLUG = "t" * 300
BIG = 2**40


@pytest.fixture
def server_probe(database_url: str) -> Iterator[Engine]:
    with probe_engine(database_url) as engine:
        yield engine


def _sweep(database_url: str, root: Path) -> None:
    store = Store(db.create_engine(database_url))
    try:
        Sweeper(store, make_settings(root, database_url), instance_id="test-names").run()
    finally:
        store.engine.dispose()


def test_present_apps_under_legal_names_are_never_swept(
    database_url: str, apps_root: Path, server_probe: Engine
) -> None:
    init_database(database_url)
    named = {seed_app(server_probe, apps_root, AppKey(name, 1)) for name in LEGAL_NAMES}
    plain = seed_app(server_probe, apps_root, AppKey(SLUG, 1))
    orphan = seed_app(server_probe, apps_root, AppKey(SLUG, 2), on_disk=False)
    for _ in range(2):  # the start-up sweep and every one after it
        _sweep(database_url, apps_root)
        assert {app.key: app_state(server_probe, app) for app in named} == {
            app.key: "untouched" for app in named
        }
    assert app_state(server_probe, plain) == "untouched"
    assert app_state(server_probe, orphan, "sweep") == "removed"


def _gone(engine: Engine, key: AppKey) -> bool:
    return not has_row(engine, key)


def test_removal_under_a_legal_name_is_applied_by_the_reactor(
    database_url: str, apps_root: Path, server_probe: Engine
) -> None:
    init_database(database_url)
    named = [seed_app(server_probe, apps_root, AppKey(name, 3)) for name in LEGAL_NAMES]
    kept = seed_app(server_probe, apps_root, AppKey(SLUG, 1))
    with running_service(make_settings(apps_root, database_url)):
        for app in named:
            shutil.rmtree(app.path)
            wait_until(partial(_gone, server_probe, app.key), what=str(app.key))
    assert {app.key: app_state(server_probe, app) for app in named} == {
        app.key: "removed" for app in named
    }
    assert app_state(server_probe, kept) == "untouched"


# -- values as wide as a host's columns can be -------------------------------------------------


def _create_wide_host_tables(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default host tables with a 400-character slug and BIGINT app numbers, made before
    ``init-db`` (which then leaves them as they are, as it does a host's own); the helpers seed
    and read through these tables instead of the default ones."""
    metadata = sa.MetaData()
    Table(
        "generated_applications", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("model_slug", String(400), nullable=False),
        Column("app_number", BigInteger, nullable=False),
        Column("created_at", DateTime()),
        sa.UniqueConstraint("model_slug", "app_number"),
    )
    Table(
        "analysis_tasks", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("task_id", String(400), nullable=False, unique=True),
        Column("target_model", String(400), nullable=False),
        Column("target_app_number", BigInteger, nullable=False),
        Column("status", String(20), nullable=False),
        Column("created_at", DateTime()),
        Column("started_at", DateTime()),
        Column("completed_at", DateTime()),
        Column("error_message", Text),
    )
    engine = sa.create_engine(database_url)
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    init_database(database_url)
    monkeypatch.setattr(helpers, "APPS", metadata.tables["generated_applications"])
    monkeypatch.setattr(helpers, "TASKS", metadata.tables["analysis_tasks"])


def _journalled(probe: Engine, key: AppKey) -> list[tuple[str, str]]:
    j = journal_table.c
    with probe.connect() as connection:
        rows = connection.execute(
            sa.select(j.action, j.source).where(
                j.model_slug == key.model_slug, j.app_number == key.app_number
            )
        ).all()
    return sorted((str(action), str(source)) for action, source in rows)


def test_long_slugs_and_bigint_numbers_are_removed_by_sweep_and_reactor(
    database_url: str, apps_root: Path, server_probe: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _create_wide_host_tables(database_url, monkeypatch)
    present = [seed_app(server_probe, apps_root, AppKey(SLUG, n)) for n in (1, 2, 3, 4)]
    by_sweep = [
        seed_app(server_probe, apps_root, AppKey(TOO_LONG_SLUG, 1), on_disk=False),
        seed_app(server_probe, apps_root, AppKey(SLUG, BIG), on_disk=False),
    ]
    _sweep(database_url, apps_root)
    assert [app_state(server_probe, app, "sweep") for app in by_sweep] == ["removed", "removed"]
    for app in by_sweep:
        assert _journalled(server_probe, app.key) == [
            ("app_removed", "sweep"), ("task_cancelled", "sweep"), ("task_cancelled", "sweep")
        ]

    on_disk = [
        seed_app(server_probe, apps_root, AppKey(SLUG, BIG + 1)),
        seed_app(server_probe, apps_root, AppKey(SLUG, 2**63 - 1)),
        seed_app(server_probe, apps_root, AppKey(NAME_MAX_SLUG, 1)),
    ]
    # No directory can carry this slug, so no event can name it: the hint comes straight in, as
    # from a host that knows the app went.
    hinted = seed_app(server_probe, apps_root, AppKey(TOO_LONG_SLUG, 2), on_disk=False)
    with running_service(make_settings(apps_root, database_url)) as service:
        for app in on_disk:
            shutil.rmtree(app.path)
        service.reactor.submit(AppGone(hinted.key))
        gone = [*on_disk, hinted]
        wait_until(lambda: not {app.key for app in gone} & app_keys(server_probe), what="removals")
    assert [app_state(server_probe, app) for app in gone] == ["removed"] * len(gone)
    assert [app_state(server_probe, app) for app in present] == ["untouched"] * len(present)


# -- no name forges a line -----------------------------------------------------------------------


class _Lines(logging.Handler):
    """Every record of the ``fswatch_sync`` loggers, formatted as a plain stream handler would."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.stream = io.StringIO()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


def test_a_newline_in_a_slug_gives_one_log_line_and_one_journal_line(
    url: str, apps_root: Path, probe: Engine, tmp_path: Path
) -> None:
    evil = seed_app(probe, apps_root, AppKey(NEWLINE_SLUG, 1))
    seed_app(probe, apps_root, AppKey(SLUG, 1))
    lines = _Lines()
    package = logging.getLogger("fswatch_sync")
    level = package.level
    package.addHandler(lines)
    package.setLevel(logging.INFO)
    try:
        with running_service(make_settings(apps_root, url)):
            shutil.rmtree(evil.path)
            wait_until(lambda: not has_row(probe, evil.key), what="the removal")
    finally:
        package.removeHandler(lines)
        package.setLevel(level)
    assert app_state(probe, evil) == "removed"
    removal = [line for line in lines.lines() if "removed 1 app row(s)" in line]
    assert removal == [
        "INFO fswatch_sync.reactor: removed 1 app row(s), cancelled 2 task(s): "
        f"evil\\n{FORGED}/app1"
    ]
    assert not any(line.startswith(FORGED[:10]) for line in lines.lines())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fswatch_sync", *args, "--root", str(apps_root),
             "--database-url", url],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("FSWATCH_SYNC_")},
        )

    journal = cli("journal")
    assert journal.returncode == 0, journal.stderr
    table = journal.stdout.splitlines()
    assert len(table) == 1 + 3, journal.stdout  # the header, the app and its two tasks
    assert all(f"evil\\n{FORGED}/app1" in line for line in table[1:]), journal.stdout

    # The app is regenerated: restoring its old row is refused with a message naming it.
    add_app_row(probe, evil.key)
    j = journal_table.c
    with probe.connect() as connection:
        (entry,) = connection.execute(
            sa.select(j.id).where(j.action == "app_removed", j.model_slug == NEWLINE_SLUG)
        ).one()
    restore = cli("restore", "--id", str(entry))
    assert restore.returncode == 1, (restore.stdout, restore.stderr)
    assert restore.stderr.splitlines() == [
        f"fswatch-sync: journal entry {entry}: app evil\\n{FORGED}/app1 has a new row now"
        " (regenerated?)"
    ]


def test_the_daemons_log_format_keeps_each_record_on_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fswatch_sync.cli import configure_logging

    package = logging.getLogger("fswatch_sync")
    saved = (package.handlers[:], package.level, package.propagate)
    try:
        configure_logging("INFO")
        logging.getLogger("fswatch_sync.test").warning("cannot remove %s", f"{NEWLINE_SLUG}/app1")
    finally:
        package.handlers[:], package.level, package.propagate = saved
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(f"WARNING fswatch_sync.test: cannot remove evil\\n{FORGED}/app1")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("openai_gpt-4", "openai_gpt-4"),
        ("модель a\\b ~user", "модель a\\b ~user"),  # printable: as it is
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[31mred\x7f", "\\x1b[31mred\\x7f"),
        ("line\u2028sep\u0085", "line\\u2028sep\\x85"),
        ("bad\udcffbyte", "bad\\udcffbyte"),  # a non-UTF-8 byte, as os.fsdecode gives it
        ("\U000e0041tag", "\\U000e0041tag"),
    ],
)
def test_printable_escapes_exactly_what_is_not_printable(name: str, shown: str) -> None:
    assert printable(name) == shown
    assert len(printable(name).splitlines()) == 1
