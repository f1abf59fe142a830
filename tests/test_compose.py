"""docs/compose.yaml: valid YAML, and every fswatch-sync command in it parses with the real CLI
parser and resolves to valid settings with the environment the file gives it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fswatch_sync.cli_args import build_parser, settings_from
from fswatch_sync.settings import Settings

COMPOSE = Path(__file__).resolve().parent.parent / "docs" / "compose.yaml"
# What the operator exports before `docker compose up` (the file insists on these two).
OPERATOR_ENV = {"POSTGRES_PASSWORD": "secret", "FSWATCH_SYNC_HTTP_TOKEN": "token"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} interpolation."""

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if environ.get(name):
            return environ[name]
        if kind == "-":
            return rest
        raise AssertionError(f"{name} unset: {rest}")

    return _VARIABLE.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def fswatch_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [None])[0] == "fswatch-sync"
    }


def resolve(
    service: dict[str, Any], tmp_path: Path, operator: dict[str, str] = OPERATOR_ENV
) -> tuple[list[str], Settings]:
    argv = [interpolate(str(part), operator) for part in service["command"][1:]]
    args = build_parser().parse_args(argv)  # exits 2 on anything the real CLI refuses
    environ = {k: interpolate(str(v), operator) for k, v in service["environment"].items()}
    # The container's root does not exist here; its parent must, for the settings to load.
    assert environ["FSWATCH_SYNC_ROOT"].startswith("/srv/webapp/generated/")
    environ["FSWATCH_SYNC_ROOT"] = str(tmp_path / "apps")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("FSWATCH_SYNC_")]:
            patch.delenv(name)
        for name, value in environ.items():
            patch.setenv(name, value)
        return argv, settings_from(args)


def test_compose_file_is_yaml_with_the_expected_services(compose: dict[str, Any]) -> None:
    assert {"fswatch-sync", "fswatch-sync-migrate", "worker", "beat", "web"} <= set(
        compose["services"]
    )
    assert set(fswatch_services(compose)) == {"fswatch-sync", "fswatch-sync-migrate"}


def test_watcher_command_parses_and_its_settings_load(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    service = compose["services"]["fswatch-sync"]
    argv, settings = resolve(service, tmp_path)
    assert argv[0] == "run"
    assert settings.http == "0.0.0.0:9108"
    assert settings.http_token == "token"
    assert settings.observer == "auto"
    assert settings.enabled is False
    assert settings.root_marker == ".fswatch-sync-root"
    assert settings.database_url.startswith("postgresql+psycopg://webapp:secret@db:5432/")

    # The tree is mounted read-only where the root lives; the health check asks /healthz on
    # the port the command binds.
    assert any(
        volume.endswith(":/srv/webapp/generated:ro") for volume in service["volumes"]
    ), service["volumes"]
    check = " ".join(service["healthcheck"]["test"])
    assert "http://127.0.0.1:9108/healthz" in check


def test_polling_observer_is_accepted(compose: dict[str, Any], tmp_path: Path) -> None:
    """The Docker Desktop advice: FSWATCH_SYNC_OBSERVER=polling from the operator's shell."""
    operator = {**OPERATOR_ENV, "FSWATCH_SYNC_OBSERVER": "polling"}
    _, settings = resolve(compose["services"]["fswatch-sync"], tmp_path, operator)
    assert settings.observer == "polling"


def test_migrate_command_parses(compose: dict[str, Any], tmp_path: Path) -> None:
    service = compose["services"]["fswatch-sync-migrate"]
    argv, settings = resolve(service, tmp_path)
    assert argv == ["db", "upgrade"]
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert service["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("fswatch-sync", "worker", "web"):
        depends = compose["services"][name]["depends_on"]["fswatch-sync-migrate"]
        assert depends["condition"] == "service_completed_successfully"


def test_a_bad_command_would_be_caught(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        resolve({"command": ["fswatch-sync", "db", "upgrad"], "environment": {
            "FSWATCH_SYNC_ROOT": "/srv/webapp/generated/apps"}}, tmp_path)
    assert exit_info.value.code == 2
