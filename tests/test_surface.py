"""What an operator meets first, through the real command (a subprocess): one-line errors with
the right exit status, hidden secrets, read-only reads, usage mistakes, and the CLI's shape."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    add_app_row,
    init_database,
    probe_engine,
    stays_false,
    sweep_rows,
    wait_until,
)

from fswatch_sync import (
    __version__,
    cli,
    cli_args,
    cli_store,
    db,
    errors,
    sweep,
    sweep_plan,
    sweep_report,
)
from fswatch_sync.dburl import redact_url
from fswatch_sync.errors import SettingsError
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import tool_metadata
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.settings import load_settings
from fswatch_sync.settingsources import MAX_CONFIG_BYTES

REPO = Path(__file__).resolve().parent.parent
SECRET = "hunter2-secret"
SLUG = "model"


def environ(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }
    env.update(extra)
    return env


def run_cli(
    args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 60,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fswatch_sync", *args],
        cwd=cwd, env=env if env is not None else environ(), capture_output=True, text=True,
        timeout=timeout, check=False, **kwargs,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with ``code`` and said so in one line holding every needle."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    (tmp_path / "generated" / "apps").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def sqlite_db(scratch: Path) -> str:
    url = f"sqlite:///{scratch / 'fs.db'}"
    init_database(url)
    return url


def seed_orphans(url: str, root: Path, *, present: int, orphans: int) -> list[AppKey]:
    """Old rows: ``present`` with a directory, ``orphans`` without. Returns the orphans."""
    old = db.utcnow() - timedelta(days=1)
    gone = []
    with probe_engine(url) as engine:
        for number in range(1, present + orphans + 1):
            key = AppKey(SLUG, number)
            add_app_row(engine, key, old)
            if number <= present:
                (root / SLUG / f"app{number}").mkdir(parents=True, exist_ok=True)
            else:
                gone.append(key)
    return gone


# -- item 1: one line instead of a traceback --------------------------------------------------


@pytest.mark.parametrize(("url", "module", "extra"), [
    ("postgresql+psycopg://app@127.0.0.1:5432/app", "psycopg", "postgres"),
    ("mysql+pymysql://app@127.0.0.1:3306/app", "pymysql", "mysql"),
])
def test_a_missing_driver_names_the_extra_to_install(
    scratch: Path, url: str, module: str, extra: str
) -> None:
    shadow = scratch / "shadow" / module
    shadow.mkdir(parents=True)
    # The driver as it is on a machine without the extra: importing it fails.
    (shadow / "__init__.py").write_text(
        f"raise ModuleNotFoundError('No module named ' + {module!r}, name={module!r})\n"
    )
    env = environ(PYTHONPATH=str(scratch / "shadow"), FSWATCH_SYNC_DATABASE_URL=url)
    for command in (["status"], ["sweep", "--dry-run"], ["init-db"]):
        result = run_cli(command, scratch, env=env)
        line = one_line_error(result, 2, "FSWATCH_SYNC_DATABASE_URL", f"fswatch_sync[{extra}]")
        assert result.returncode == 2 and f"fswatch_sync[{extra}]" in line


def test_an_unknown_mysql_query_option_is_one_line(scratch: Path) -> None:
    env = environ(FSWATCH_SYNC_DATABASE_URL="mysql+pymysql://root@127.0.0.1:3306/test?chrset=utf8")
    line = one_line_error(run_cli(["status"], scratch, env=env), 2, "'chrset'")
    assert "charset" in line  # the near miss is suggested


def test_run_on_a_busy_port_fails_before_the_start_up_sweep(
    scratch: Path, sqlite_db: str
) -> None:
    root = scratch / "generated" / "apps"
    orphans = seed_orphans(sqlite_db, root, present=3, orphans=1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            ["run", "--http", f"127.0.0.1:{port}"], scratch,
            env=environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db), timeout=30,
        )
    one_line_error(result, 2, "http", f"127.0.0.1:{port}")
    with probe_engine(sqlite_db) as engine:
        assert sweep_rows(engine) == []
        with engine.connect() as connection:
            count = connection.execute(sa.text("SELECT count(*) FROM generated_applications"))
            assert count.scalar_one() == 4, f"the start-up sweep ran: {orphans} removed"


@pytest.mark.parametrize("command", [["status"], ["journal"], ["status", "--json"], ["--help"]])
def test_a_reader_that_goes_away_is_not_a_traceback(
    scratch: Path, sqlite_db: str, command: list[str]
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited: every write meets EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fswatch_sync", *command], cwd=scratch,
            env=environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db), stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.returncode


def test_config_files_that_are_not_settings_are_refused_in_one_line(scratch: Path) -> None:
    fifo = scratch / "settings.fifo"
    os.mkfifo(fifo)
    deep = scratch / "deep.toml"
    deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    huge = scratch / "huge.toml"
    huge.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    cases = [
        ("/dev/zero", "not a regular file"),
        (str(fifo), "not a regular file"),
        (str(scratch), "not a regular file"),
        (str(deep), "too deeply"),
        (str(huge), "larger than"),
    ]
    for path, problem in cases:
        result = run_cli(["status", "--config", path], scratch, timeout=20)
        one_line_error(result, 2, "config", problem)
        # The same file through the environment variable.
        result = run_cli(["init-db"], scratch, env=environ(FSWATCH_SYNC_CONFIG=path), timeout=20)
        one_line_error(result, 2, "config", problem)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_force_sweep_with_an_interpreter_lacking_the_dependencies(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "force-sweep", checkout / "scripts" / "force-sweep")
    (checkout / "fswatch_sync").symlink_to(REPO / "fswatch_sync")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A python3 without site-packages: what a system interpreter outside the venv looks like.
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    fake.chmod(0o755)
    env = environ(PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    env.pop("PYTHON", None)
    result = subprocess.run(
        [str(checkout / "scripts" / "force-sweep"), "--dry-run"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )
    one_line_error(result, 2, "force-sweep", "python3", ".venv")


def test_force_sweep_uses_the_checkouts_venv(scratch: Path, sqlite_db: str) -> None:
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("this checkout has no .venv")
    env = environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db, PATH="/usr/bin:/bin")
    env.pop("PYTHON", None)
    seed_orphans(sqlite_db, scratch / "generated" / "apps", present=1, orphans=0)
    result = subprocess.run(
        [str(REPO / "scripts" / "force-sweep"), "--json", "--dry-run"], cwd=scratch, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dry_run"] is True


# -- item 2: secrets -------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://app:{SECRET}@db/app",
    f"postgresql+psycopg://app@db/app?password={SECRET}",
    f"postgresql+psycopg://app@db/app?sslpassword={SECRET}&application_name=x",
    f"mysql+pymysql://app@db/app?passwd={SECRET}",
    f"mysql+pymysql://app@db/app?ssl_key_password={SECRET}",
    f"postgresql+psycopg://app:{SECRET}@db/app?password={SECRET}",
])
def test_redact_url_hides_every_password(url: str) -> None:
    shown = redact_url(url)
    assert SECRET not in shown
    assert "***" in shown
    assert shown.startswith(url.split("://")[0] + "://app")


def test_a_password_in_the_url_never_shows(
    scratch: Path, server_databases: Any
) -> None:
    """init-db, status (human and JSON), run's log and GET /status, on PostgreSQL (trust
    authentication ignores the password, so the URL works while carrying one)."""
    server = server_databases["postgres"]
    if server.url is None:
        pytest.skip(server.error or "postgres unavailable")
    parsed = sa.make_url(server.url)
    url = parsed.set(password=SECRET, query={"password": SECRET}).render_as_string(
        hide_password=False
    )
    env = environ(FSWATCH_SYNC_DATABASE_URL=url)
    outputs = []
    for command in (["init-db"], ["status"], ["status", "--json"], ["journal", "--json"]):
        result = run_cli(command, scratch, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert "***" in outputs[2]
    (scratch / "generated" / "apps" / SLUG / "app1").mkdir(parents=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "fswatch_sync", "run", "--http", "127.0.0.1:0",
         "--log-level", "DEBUG"],
        cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        port: list[int] = []

        def endpoint_up() -> bool:
            line = process.stderr.readline() if process.stderr else ""
            lines.append(line)
            if "http endpoint on" in line:
                port.append(int(line.rsplit(":", 1)[1]))
            return bool(port) or process.poll() is not None

        wait_until(endpoint_up, 30, "the http endpoint")
        assert port, "".join(lines)
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", port[0], timeout=10)
        connection.request("GET", f"/status?token={SECRET}")
        body = connection.getresponse().read().decode()
        connection.close()
        assert "***" in body
        outputs.append(body)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    outputs.append("".join(lines) + out + err)
    assert process.returncode == 0, err
    for text in outputs:
        assert SECRET not in text, text


# -- item 4: read-only commands create nothing -------------------------------------------------


def test_reading_a_missing_sqlite_file_creates_nothing(scratch: Path) -> None:
    mistyped = scratch / "fswatch_synk.db"
    env = environ(FSWATCH_SYNC_DATABASE_URL=f"sqlite:///{mistyped}")
    for command in (["status"], ["status", "--json"], ["journal"], ["restore", "--id", "1"]):
        one_line_error(run_cli(command, scratch, env=env), 1, "init-db", str(mistyped.name))
    assert not mistyped.exists()


def test_reading_a_database_without_the_tables_creates_none(
    scratch: Path, database_url: str
) -> None:
    parsed = sa.make_url(database_url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database
        sqlite3.connect(parsed.database).close()  # an empty database file
    env = environ(FSWATCH_SYNC_DATABASE_URL=database_url)
    for command in (["status"], ["journal", "--json"], ["restore", "--id", "1"]):
        one_line_error(run_cli(command, scratch, env=env), 1, "init-db", "fswatch_sync_")
    with probe_engine(database_url) as engine:
        tables = set(sa.inspect(engine).get_table_names())
    assert not tables & set(tool_metadata.tables), tables


# -- item 5: journal and restore edges -------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["restore"], "--id, --batch or --since/--until"),
    (["restore", "--app", f"{SLUG}/app1"], "--app only narrows"),
    (["restore", "--action", "app_removed"], "--action only narrows"),
    (["restore", "--id", "5-2"], "backwards"),
    (["restore", "--id", "1-999999999"], "spans more than"),
    (["restore", "--id", "x"], "--id"),
    (["journal", "--limit", "-1"], "--limit"),
    (["journal", "--limit", "many"], "--limit"),
    (["journal", "--action", "bogus"], "--action"),
    (["journal", "--since", "yesterday"], "--since"),
])
def test_usage_errors_exit_2_in_one_line(
    scratch: Path, sqlite_db: str, args: list[str], needle: str
) -> None:
    env = environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db)
    result = run_cli(args, scratch, env=env)
    line = one_line_error(result, 2, needle)
    assert result.returncode == 2 and needle in line


@pytest.fixture
def three_removed(scratch: Path, sqlite_db: str) -> list[AppKey]:
    """Three orphan rows removed by a real sweep: three app_removed entries in the journal."""
    root = scratch / "generated" / "apps"
    gone = seed_orphans(sqlite_db, root, present=3, orphans=3)
    result = run_cli(
        ["sweep", "--json"], scratch, env=environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["orphan_apps"] == 3
    return gone


def test_journal_says_when_it_truncates(
    scratch: Path, sqlite_db: str, three_removed: list[AppKey]
) -> None:
    env = environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db)
    cut = run_cli(["journal", "--json", "--limit", "2"], scratch, env=env)
    assert cut.returncode == 0
    assert len(json.loads(cut.stdout)) == 2
    assert "more match" in cut.stderr and "--limit 0" in cut.stderr
    for args in (["journal", "--json", "--limit", "0"], ["journal", "--json"]):
        whole = run_cli(args, scratch, env=env)
        assert whole.returncode == 0
        assert len(json.loads(whole.stdout)) == 3
        assert "more match" not in whole.stderr
    human = run_cli(["journal", "--limit", "1"], scratch, env=env)
    assert len(human.stdout.strip().splitlines()) == 2  # the header and one entry
    assert "more match" in human.stderr


def test_restore_says_which_apps_still_have_no_directory(
    scratch: Path, sqlite_db: str, three_removed: list[AppKey]
) -> None:
    env = environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db)
    names = [f"{key.model_slug}/app{key.app_number}" for key in three_removed]
    since = ["--since", "2000-01-01T00:00:00", "--action", "app_removed"]
    dry = run_cli(["restore", *since, "--dry-run", "--json"], scratch, env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["still_missing"] == names
    assert "next sweep will remove them again" in dry.stderr
    back = three_removed[0]
    (scratch / "generated" / "apps" / back.model_slug / f"app{back.app_number}").mkdir()
    real = run_cli(["restore", *since, "--json"], scratch, env=env)
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout)
    assert report["restored"] == 3
    assert report["still_missing"] == names[1:]
    human_env = environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db)
    again = run_cli(["restore", *since], scratch, env=human_env)
    assert again.returncode == 1  # nothing left to restore: said in one line
    assert len(again.stderr.strip().splitlines()) == 1


# -- item 6: the CLI's shape -----------------------------------------------------------------


DAEMON_ONLY = ("--observer", "--settle-ms", "--http", "--polling-interval-seconds",
               "--max-pending-events", "--heartbeat-seconds", "--interval-seconds")


@pytest.mark.parametrize("command", ["sweep", "status", "journal", "restore", "init-db"])
def test_each_command_lists_only_its_own_flags(scratch: Path, command: str) -> None:
    result = run_cli([command, "--help"], scratch)
    assert result.returncode == 0
    shown = [flag for flag in DAEMON_ONLY if f"{flag} " in result.stdout]
    if command == "status":
        shown.remove("--heartbeat-seconds")  # status judges liveness by it
    assert shown == [], result.stdout
    assert f"usage: fswatch-sync {command}" in result.stdout
    # Hidden, not refused: a wrapper passing one set of flags to every command keeps working.
    accepted = run_cli([command, "--observer", "polling", "--help"], scratch)
    assert accepted.returncode == 0, accepted.stderr


def test_run_lists_every_setting_and_every_option_has_help(scratch: Path) -> None:
    result = run_cli(["run", "--help"], scratch)
    for flag in DAEMON_ONLY:
        assert flag in result.stdout
    parser = cli.build_parser()
    subparsers = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"


def test_version(scratch: Path) -> None:
    result = run_cli(["--version"], scratch)
    assert result.returncode == 0
    assert result.stdout.strip() == f"fswatch-sync {__version__}"


def test_public_names_are_importable_from_cli_and_sweep() -> None:
    """Callers import these from ``fswatch_sync.cli`` and ``fswatch_sync.sweep``, whichever
    module defines them."""
    for module in (cli, sweep):
        assert all(hasattr(module, name) for name in module.__all__), module.__name__
    assert cli.build_parser is cli_args.build_parser
    assert cli.DatabaseNotReady is cli_store.DatabaseNotReady
    assert (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_SETTINGS, cli.EXIT_REFUSED) == (0, 1, 2, 3)
    assert sweep.SweepReport is sweep_report.SweepReport
    assert (sweep.guard, sweep.orphan_keys) == (sweep_plan.guard, sweep_plan.orphan_keys)
    assert (sweep.SweepRefused, sweep.SweepInterrupted) == (
        errors.SweepRefused, errors.SweepInterrupted
    )


def test_a_refused_sweep_reports_what_the_guard_saw(scratch: Path, sqlite_db: str) -> None:
    seed_orphans(sqlite_db, scratch / "generated" / "apps", present=1, orphans=3)
    result = run_cli(
        ["sweep", "--json"], scratch, env=environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db)
    )
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["refused"]
    assert (report["app_rows"], report["app_dirs"]) == (4, 1)
    assert report["started_at"] is not None
    assert report["orphan_apps"] == 0


def test_an_unknown_environment_variable_is_warned_about(scratch: Path, sqlite_db: str) -> None:
    env = environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db, FSWATCH_SYNC_ROT="/srv/apps",
                  FSWATCH_SYNC_INTERVAL="60")
    result = run_cli(["status"], scratch, env=env)
    assert result.returncode == 0, result.stderr
    assert "FSWATCH_SYNC_ROT is not a setting" in result.stderr
    assert "did you mean FSWATCH_SYNC_ROOT" in result.stderr
    assert "FSWATCH_SYNC_INTERVAL is not a setting" in result.stderr
    clean = run_cli(["status"], scratch, env=environ(FSWATCH_SYNC_DATABASE_URL=sqlite_db))
    assert "not a setting" not in clean.stderr


def test_enabled_false_runs_no_start_up_sweep(scratch: Path, sqlite_db: str) -> None:
    from helpers import running_service

    from fswatch_sync.settings import Settings

    root = scratch / "generated" / "apps"
    seed_orphans(sqlite_db, root, present=2, orphans=1)
    settings = Settings(root=root, database_url=sqlite_db, enabled=False, settle_ms=0)
    with running_service(settings, initial_sweep=True), probe_engine(sqlite_db) as engine:
        assert stays_false(lambda: sweep_rows(engine), 1.5)
    enabled = Settings(root=root, database_url=sqlite_db, settle_ms=0)
    with running_service(enabled, initial_sweep=True), probe_engine(sqlite_db) as engine:
        wait_until(lambda: sweep_rows(engine), what="the start-up sweep")


# -- settings through a Flask app ------------------------------------------------------------


def test_a_bad_flask_config_value_names_the_config_key(scratch: Path) -> None:
    flask = pytest.importorskip("flask")

    from fswatch_sync.flask import FswatchSync

    app = flask.Flask("host")
    app.config.update(FSWATCH_SYNC_ROOT=str(scratch / "generated" / "apps"),
                      FSWATCH_SYNC_INTERVAL_SECONDS="soon",
                      SQLALCHEMY_DATABASE_URI=f"sqlite:///{scratch / 'x.db'}")
    with pytest.raises(SettingsError) as caught:
        FswatchSync(app)
    assert str(caught.value).startswith("FSWATCH_SYNC_INTERVAL_SECONDS (Flask config):")


FLASK_APP = """
from flask import Flask
from fswatch_sync.flask import FswatchSync

app = Flask(__name__)
app.config["FSWATCH_SYNC_ROOT"] = "generated/apps"
app.config["FSWATCH_SYNC_DATABASE_URL"] = {url!r}
app.config["FSWATCH_SYNC_BATCH_SIZE"] = {batch!r}
FswatchSync(app, autostart=False)
"""


def test_flask_commands_say_their_prog_and_name_config_keys(
    scratch: Path, sqlite_db: str
) -> None:
    pytest.importorskip("flask")
    flask_bin = Path(sys.executable).parent / "flask"
    (scratch / "hostapp.py").write_text(FLASK_APP.format(url=sqlite_db, batch=100))

    def flask_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(flask_bin), "--app", "hostapp", "fswatch-sync", *args], cwd=scratch,
            env=environ(), capture_output=True, text=True, timeout=60, check=False,
        )

    helped = flask_cli("sweep", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage: flask fswatch-sync sweep" in helped.stdout
    wrong = flask_cli("journal", "--limit", "-3")
    assert wrong.returncode == 2
    assert "flask fswatch-sync journal: error" in wrong.stderr
    assert flask_cli("status").returncode == 0


def test_flask_passthrough_names_the_config_key_of_a_bad_value() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"batch_size": "0"}, environ={},
                      flag_origins={"batch_size": "FSWATCH_SYNC_BATCH_SIZE (Flask config)"},
                      require_root=False)
    assert "FSWATCH_SYNC_BATCH_SIZE" in str(caught.value)


# -- item 7: config bounds -------------------------------------------------------------------


@pytest.mark.parametrize("template", [
    "{app_number:>20000000}", "{model_slug:.100000}", "{app_number:{model_slug}}", "x" * 1200,
])
def test_cancel_message_is_bounded(template: str) -> None:
    with pytest.raises(SettingsError, match=r"schema\.cancel_message"):
        SchemaConfig.from_mapping({"cancel_message": template})
    ok = SchemaConfig.from_mapping({"cancel_message": "gone: {model_slug}/app{app_number}"})
    assert ok.cancel_message.startswith("gone")


def test_cancel_message_bound_through_the_command(scratch: Path) -> None:
    config = scratch / "fs.toml"
    config.write_text('[schema]\ncancel_message = "{app_number:>20000000}"\n')
    result = run_cli(["init-db", "--config", str(config)], scratch)
    line = one_line_error(result, 2, "schema.cancel_message", "format spec")
    assert result.returncode == 2 and "{app_number" in line
    assert not (scratch / "fswatch_sync.db").exists(), "refused before any database was made"
