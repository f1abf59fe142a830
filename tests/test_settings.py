"""Settings: defaults, environment, TOML file, flags, precedence, seed aliases, bad values, and
the modules user code imports their names from."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fswatch_sync.errors import SettingsError
from fswatch_sync.settings import Settings, describe, load_settings

ENV = "FSWATCH_SYNC_"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory where the default root's parent (``generated/``) exists."""
    (tmp_path / "generated").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults(workdir: Path) -> None:
    settings = load_settings({}, environ={})
    assert settings.root == workdir / "generated" / "apps"
    assert settings.root.is_absolute()
    assert settings.database_url == "sqlite:///fswatch_sync.db"
    assert settings.interval_seconds == 3600
    assert settings.running_timeout_minutes == 60
    assert settings.pending_timeout_minutes == 60
    assert settings.task_retention_days == 30
    assert settings.journal_retention_days == 90
    assert settings.app_grace_minutes == 10
    assert settings.cleanup_orphan_apps is True
    assert settings.cleanup_orphan_tasks is True
    assert settings.cleanup_stuck_tasks is True
    assert settings.cleanup_old_tasks is True
    assert settings.max_delete_fraction == 0.5
    assert settings.enabled is True
    assert settings.schema.apps_table == "generated_applications"
    assert settings.schema.tasks_table == "analysis_tasks"


def test_every_spec_setting_from_the_environment(workdir: Path) -> None:
    (workdir / "data").mkdir()
    environ = {
        f"{ENV}ROOT": str(workdir / "data" / "apps"),
        f"{ENV}DATABASE_URL": f"sqlite:///{workdir / 'data' / 'x.db'}",
        f"{ENV}INTERVAL_SECONDS": "120",
        f"{ENV}RUNNING_TIMEOUT_MINUTES": "7.5",
        f"{ENV}PENDING_TIMEOUT_MINUTES": "0",
        f"{ENV}TASK_RETENTION_DAYS": "2",
        f"{ENV}APP_GRACE_MINUTES": "3",
        f"{ENV}CLEANUP_ORPHAN_APPS": "false",
        f"{ENV}CLEANUP_ORPHAN_TASKS": "0",
        f"{ENV}CLEANUP_STUCK_TASKS": "no",
        f"{ENV}CLEANUP_OLD_TASKS": "OFF",
        f"{ENV}MAX_DELETE_FRACTION": "1",
    }
    settings = load_settings({}, environ=environ)
    assert settings.root == workdir / "data" / "apps"
    assert settings.database_url == f"sqlite:///{workdir / 'data' / 'x.db'}"
    assert settings.interval_seconds == 120
    assert settings.running_timeout_minutes == 7.5
    assert settings.pending_timeout_minutes == 0
    assert settings.task_retention_days == 2
    assert settings.app_grace_minutes == 3
    assert not settings.cleanup_orphan_apps
    assert not settings.cleanup_orphan_tasks
    assert not settings.cleanup_stuck_tasks
    assert not settings.cleanup_old_tasks
    assert settings.max_delete_fraction == 1.0


def test_toml_file_by_argument_and_by_environment(workdir: Path) -> None:
    config = _toml(
        workdir / "conf.toml",
        'interval_seconds = 90\ncleanup_old_tasks = false\nmax_delete_fraction = 0.25\n'
        'root = "generated/other"\n'
        '[schema]\napps_table = "apps"\n[schema.statuses]\nextra_terminal = ["skipped"]\n',
    )
    for settings in (
        load_settings({}, environ={}, config_path=config),
        load_settings({}, environ={"FSWATCH_SYNC_CONFIG": str(config)}),
    ):
        assert settings.interval_seconds == 90
        assert settings.cleanup_old_tasks is False
        assert settings.max_delete_fraction == 0.25
        assert settings.root == workdir / "generated" / "other"
        assert settings.schema.apps_table == "apps"
        assert "skipped" in settings.schema.statuses.terminal
        assert settings.running_timeout_minutes == 60  # untouched: default


def test_config_argument_wins_over_config_variable(workdir: Path) -> None:
    first = _toml(workdir / "a.toml", "interval_seconds = 1\n")
    second = _toml(workdir / "b.toml", "interval_seconds = 2\n")
    settings = load_settings({}, environ={"FSWATCH_SYNC_CONFIG": str(second)}, config_path=first)
    assert settings.interval_seconds == 1


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        ("11", "22", "33", 11),
        (None, "22", "33", 22),
        (None, None, "33", 33),
        (None, None, None, 3600),
        ("11", None, "33", 11),
        ("11", "22", None, 11),
    ],
)
def test_precedence_flag_env_file_default(
    workdir: Path, flag: str | None, env: str | None, file: str | None, expected: float
) -> None:
    config = _toml(workdir / "c.toml", f"interval_seconds = {file}\n" if file else "")
    environ = {f"{ENV}INTERVAL_SECONDS": env} if env else {}
    settings = load_settings({"interval_seconds": flag}, environ=environ, config_path=config)
    assert settings.interval_seconds == expected


def test_a_bad_value_in_an_overridden_source_is_not_read(workdir: Path) -> None:
    config = _toml(workdir / "c.toml", 'interval_seconds = "soon"\n')
    settings = load_settings(
        {}, environ={f"{ENV}INTERVAL_SECONDS": "5"}, config_path=config
    )
    assert settings.interval_seconds == 5


# -- the seed's aliases -------------------------------------------------------------------------


def test_stuck_alias_sets_both_timeouts(workdir: Path) -> None:
    settings = load_settings({}, environ={"MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES": "15"})
    assert settings.running_timeout_minutes == 15
    assert settings.pending_timeout_minutes == 15


def test_stuck_alias_yields_to_the_specific_ones_wherever_they_are_set(workdir: Path) -> None:
    alias = {"MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES": "15"}
    by_env = load_settings({}, environ={**alias, f"{ENV}RUNNING_TIMEOUT_MINUTES": "5"})
    assert (by_env.running_timeout_minutes, by_env.pending_timeout_minutes) == (5, 15)

    by_flag = load_settings({"pending_timeout_minutes": "4"}, environ=alias)
    assert (by_flag.running_timeout_minutes, by_flag.pending_timeout_minutes) == (15, 4)

    config = _toml(workdir / "c.toml", "running_timeout_minutes = 120\n")
    by_file = load_settings({}, environ=alias, config_path=config)
    assert (by_file.running_timeout_minutes, by_file.pending_timeout_minutes) == (120, 15)


def test_other_seed_aliases(workdir: Path) -> None:
    environ = {
        "MAINTENANCE_ENABLED": "false",
        "MAINTENANCE_INTERVAL_SECONDS": "900",
        "MAINTENANCE_TASK_RETENTION_DAYS": "7",
    }
    settings = load_settings({}, environ=environ)
    assert settings.enabled is False
    assert settings.interval_seconds == 900
    assert settings.task_retention_days == 7


def test_fswatch_sync_variables_win_over_aliases(workdir: Path) -> None:
    environ = {
        "MAINTENANCE_ENABLED": "false",
        f"{ENV}ENABLED": "true",
        "MAINTENANCE_INTERVAL_SECONDS": "900",
        f"{ENV}INTERVAL_SECONDS": "60",
        "MAINTENANCE_TASK_RETENTION_DAYS": "7",
        f"{ENV}TASK_RETENTION_DAYS": "9",
    }
    settings = load_settings({}, environ=environ)
    assert settings.enabled is True
    assert settings.interval_seconds == 60
    assert settings.task_retention_days == 9


# -- bad values ---------------------------------------------------------------------------------

BAD_ENVIRONMENTS: list[tuple[dict[str, str], str]] = [
    ({f"{ENV}INTERVAL_SECONDS": "hourly"}, f"{ENV}INTERVAL_SECONDS"),
    ({f"{ENV}INTERVAL_SECONDS": "0"}, f"{ENV}INTERVAL_SECONDS"),
    ({f"{ENV}RUNNING_TIMEOUT_MINUTES": "-1"}, f"{ENV}RUNNING_TIMEOUT_MINUTES"),
    ({f"{ENV}PENDING_TIMEOUT_MINUTES": "nan"}, f"{ENV}PENDING_TIMEOUT_MINUTES"),
    ({f"{ENV}TASK_RETENTION_DAYS": "inf"}, f"{ENV}TASK_RETENTION_DAYS"),
    ({f"{ENV}APP_GRACE_MINUTES": ""}, f"{ENV}APP_GRACE_MINUTES"),
    ({f"{ENV}MAX_DELETE_FRACTION": "1.5"}, f"{ENV}MAX_DELETE_FRACTION"),
    ({f"{ENV}MAX_DELETE_FRACTION": "-0.1"}, f"{ENV}MAX_DELETE_FRACTION"),
    ({f"{ENV}CLEANUP_OLD_TASKS": "maybe"}, f"{ENV}CLEANUP_OLD_TASKS"),
    ({f"{ENV}JOURNAL_RETENTION_DAYS": "-1"}, f"{ENV}JOURNAL_RETENTION_DAYS"),
    ({f"{ENV}JOURNAL_RETENTION_DAYS": "forever"}, f"{ENV}JOURNAL_RETENTION_DAYS"),
    ({f"{ENV}BATCH_SIZE": "0"}, f"{ENV}BATCH_SIZE"),
    ({f"{ENV}BATCH_SIZE": "2.5"}, f"{ENV}BATCH_SIZE"),
    ({f"{ENV}ROOT": "/nonexistent-fswatch/parent/apps"}, f"{ENV}ROOT"),
    ({f"{ENV}ROOT": ""}, f"{ENV}ROOT"),
    ({f"{ENV}DATABASE_URL": "not a url"}, f"{ENV}DATABASE_URL"),
    ({f"{ENV}DATABASE_URL": "nosuchdialect://host/db"}, f"{ENV}DATABASE_URL"),
    ({f"{ENV}DATABASE_URL": "sqlite:////nonexistent-fswatch/dir/x.db"}, f"{ENV}DATABASE_URL"),
    ({"MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES": "-5"}, "MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES"),
    ({"MAINTENANCE_ENABLED": "sometimes"}, "MAINTENANCE_ENABLED"),
    ({"FSWATCH_SYNC_CONFIG": "/nonexistent-fswatch/c.toml"}, "config"),
]


@pytest.mark.parametrize(("environ", "setting"), BAD_ENVIRONMENTS)
def test_bad_environment_values_name_the_setting(
    workdir: Path, environ: dict[str, str], setting: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, environ=environ)
    assert caught.value.setting == setting
    assert setting in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("intervall_seconds = 5\n", "intervall_seconds"),
        ('interval_seconds = "soon"\n', "interval_seconds"),
        ("interval_seconds = true\n", "interval_seconds"),
        ("running_timeout_minutes = -3\n", "running_timeout_minutes"),
        ("max_delete_fraction = 2\n", "max_delete_fraction"),
        ("root = 5\n", "root"),
        ('root = "/nonexistent-fswatch/parent/apps"\n', "root"),
        ('database_url = "::"\n', "database_url"),
        ("batch_size = 1.5\n", "batch_size"),
        ("interval_seconds = [\n", "config"),
        ("schema = 3\n", "schema"),
        ("[schema]\nbogus = 1\n", "schema.bogus"),
        ('[schema.statuses]\nextra_active = ["completed"]\n', "schema.statuses"),
    ],
)
def test_bad_file_values_name_the_setting(workdir: Path, text: str, setting: str) -> None:
    config = _toml(workdir / "c.toml", text)
    with pytest.raises(SettingsError) as caught:
        load_settings({}, environ={}, config_path=config)
    assert caught.value.setting.startswith(setting)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        ({"running_timeout_minutes": "-1"}, "--running-timeout-minutes"),
        ({"max_delete_fraction": "1.01"}, "--max-delete-fraction"),
        ({"interval_seconds": "x"}, "--interval-seconds"),
        ({"no_such_setting": "1"}, "no_such_setting"),
    ],
)
def test_bad_flag_values_name_the_flag(
    workdir: Path, flags: dict[str, str], setting: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(flags, environ={})
    assert caught.value.setting == setting


def test_default_root_needs_its_parent_only_where_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no generated/ here
    with pytest.raises(SettingsError) as caught:
        load_settings({}, environ={})
    assert caught.value.setting.startswith("root")
    # Commands that never read the tree (init-db, status...) work from any directory...
    settings = load_settings({}, environ={}, require_root=False)
    assert settings.root == tmp_path / "generated" / "apps"
    # ...but a root that is given must still make sense.
    with pytest.raises(SettingsError) as caught:
        load_settings({"root": str(tmp_path / "nope" / "apps")}, environ={}, require_root=False)
    assert caught.value.setting == "--root"


def test_commands_that_ignore_the_tree_run_anywhere(tmp_path: Path) -> None:
    env = {f"{ENV}DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    assert not (tmp_path / "generated").exists()
    for args in (["init-db"], ["status", "--json"], ["journal", "--json"]):
        result = _run_cli(args, tmp_path, env)
        assert result.returncode == 0, (args, result.stderr)
    sweep = _run_cli(["sweep"], tmp_path, env)
    assert sweep.returncode == 2
    assert "root" in sweep.stderr


def test_describe_hides_secrets(workdir: Path) -> None:
    settings = load_settings(
        {"database_url": "postgresql+psycopg://u:hunter2@db/x"},
        environ={f"{ENV}HTTP_TOKEN": "tok3n"},
    )
    described = describe(settings)
    assert "hunter2" not in str(described)
    assert "tok3n" not in str(described)
    assert "hunter2" not in settings.redacted_database_url()
    assert isinstance(Settings(), Settings)


# -- through the command line -------------------------------------------------------------------


def _clean_environ() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }


def _run_cli(
    args: list[str], cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fswatch_sync", *args],
        cwd=cwd,
        env={**_clean_environ(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "config", "named"),
    [
        (["sweep"], {f"{ENV}INTERVAL_SECONDS": "hourly"}, None, f"{ENV}INTERVAL_SECONDS"),
        (["sweep", "--running-timeout-minutes", "-5"], {}, None, "--running-timeout-minutes"),
        (["sweep", "--config", "c.toml"], {}, "intervall_seconds = 1\n", "intervall_seconds"),
        (["sweep", "--config", "missing.toml"], {}, None, "config"),
        (["sweep", "--root", "/nonexistent-fswatch/parent/apps"], {}, None, "--root"),
        (["sweep", "--database-url", "not a url"], {}, None, "--database-url"),
        (["status"], {f"{ENV}DATABASE_URL": "nosuchdialect://h/d"}, None, f"{ENV}DATABASE_URL"),
        (["sweep", "--max-delete-fraction", "1.5"], {}, None, "--max-delete-fraction"),
        (["init-db"], {"MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES": "x"}, None, "MAINTENANCE_STUCK"),
        (["journal", "--since", "yesterday"], {}, None, "--since"),
        (["sweep", "--no-such-flag"], {}, None, "--no-such-flag"),
        ([], {}, None, "command"),
    ],
)
def test_cli_bad_settings_exit_2_with_one_line(
    workdir: Path, args: list[str], env: dict[str, str], config: str | None, named: str
) -> None:
    if config is not None:
        _toml(workdir / "c.toml", config)
    env = {f"{ENV}DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite'}", **env}
    result = _run_cli(args, workdir, env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert named in lines[0]
    assert result.stdout == ""


def test_cli_reads_the_config_file_by_flag_and_by_variable(workdir: Path) -> None:
    for name, args, env in (
        ("by-flag", ["init-db", "--config", "by-flag.toml"], {}),
        ("by-var", ["init-db"], {"FSWATCH_SYNC_CONFIG": str(workdir / "by-var.toml")}),
    ):
        database = workdir / f"{name}.sqlite"
        _toml(workdir / f"{name}.toml", f'database_url = "sqlite:///{database}"\n')
        result = _run_cli(args, workdir, env)
        assert result.returncode == 0, result.stderr
        assert database.exists(), name
        assert str(database) in result.stdout


# Names user code imports from fswatch_sync.settings and fswatch_sync.schema, by the module that
# defines them.
IMPORTED_FROM = {
    ("settings", "dburl"): "redact_url",
    ("settings", "settingsources"): "CONFIG_ENV MAX_CONFIG_BYTES read_config_file"
    " unknown_environment",
    ("settings", "settingspecs"): "ENV_PREFIX MAX_BATCH_SIZE MAX_DURATION_YEARS MAX_PENDING_EVENTS"
    " OBSERVER_KINDS SECRET_SETTINGS SPECS Parser SettingSpec is_loopback parse_bind",
    ("schema", "schemaconfig"): "DEPENDENT_POLICIES MAX_TEMPLATE_LENGTH AppColumns Dependent"
    " Messages SchemaConfig Statuses TaskColumns",
    ("schema", "defaulttables"): "default_host_metadata",
}


@pytest.mark.parametrize(
    ("imported_from", "home", "name"),
    [(old, home, name) for (old, home), names in IMPORTED_FROM.items() for name in names.split()],
)
def test_names_import_from_where_user_code_imports_them(
    imported_from: str, home: str, name: str
) -> None:
    public = importlib.import_module(f"fswatch_sync.{imported_from}")
    assert name in public.__all__
    assert getattr(public, name) is getattr(importlib.import_module(f"fswatch_sync.{home}"), name)
