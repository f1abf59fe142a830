"""The Settings value and where it comes from.

Every setting resolves in one place as: command-line flag, else environment, else the TOML file,
else the default. The seed system's ``MAINTENANCE_*`` variables are honoured as a fallback just
above the default: a setting given under its own name anywhere (flag, ``FSWATCH_SYNC_*``
variable or the TOML file) wins over the legacy alias, so ``MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES``
sets both timeouts unless the specific ones are set.

What each setting accepts is in settingspecs, how the file and environment are read is in
settingsources, and database URL checks are in dburl; the names user code imports from here
(``SPECS``, ``redact_url``, ``read_config_file``, ...) stay importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fswatch_sync.dburl import redact_url
from fswatch_sync.errors import SettingsError
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.settingsources import (
    CONFIG_ENV,
    MAX_CONFIG_BYTES,
    read_config_file,
    unknown_environment,
)
from fswatch_sync.settingspecs import (
    ENV_PREFIX,
    MAX_BATCH_SIZE,
    MAX_DURATION_YEARS,
    MAX_PENDING_EVENTS,
    OBSERVER_KINDS,
    SECRET_SETTINGS,
    SPEC_BY_NAME,
    SPECS,
    Parser,
    SettingSpec,
    is_loopback,
    parse_bind,
)

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "MAX_BATCH_SIZE",
    "MAX_CONFIG_BYTES",
    "MAX_DURATION_YEARS",
    "MAX_PENDING_EVENTS",
    "OBSERVER_KINDS",
    "SECRET_SETTINGS",
    "SPECS",
    "Parser",
    "SettingSpec",
    "Settings",
    "describe",
    "is_loopback",
    "load_settings",
    "parse_bind",
    "read_config_file",
    "redact_url",
    "unknown_environment",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to know, validated."""

    root: Path = Path("generated/apps")
    database_url: str = "sqlite:///fswatch_sync.db"
    interval_seconds: float = 3600.0
    running_timeout_minutes: float = 60.0
    pending_timeout_minutes: float = 60.0
    task_retention_days: float = 30.0
    journal_retention_days: float = 90.0
    app_grace_minutes: float = 10.0
    missing_grace_minutes: float = 0.0
    cancel_tasks_when_missing: bool = True
    cleanup_orphan_apps: bool = True
    cleanup_orphan_tasks: bool = True
    cleanup_stuck_tasks: bool = True
    cleanup_old_tasks: bool = True
    max_delete_fraction: float = 0.5
    enabled: bool = True
    # Small: the first batch of each rule runs before its time is known; the time budget
    # (max_transaction_ms) grows the next ones.
    batch_size: int = 200
    max_transaction_ms: float = 100.0
    observer: str = "auto"
    polling_interval_seconds: float = 1.0
    settle_ms: float = 5.0
    max_pending_events: int = 100_000
    root_marker: str = ""
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 10.0
    sweep_jitter_fraction: float = 0.1
    http: str = ""
    http_token: str = ""
    log_level: str = "INFO"
    schema: SchemaConfig = field(default_factory=SchemaConfig)

    def redacted_database_url(self) -> str:
        """The database URL with any password hidden, fit for logs and status output."""
        return redact_url(self.database_url)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
    *,
    require_root: bool = True,
    flag_origins: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting from flags, environment, TOML file and defaults.

    ``flags`` maps setting names to values given on the command line (``None`` means unset).
    Raises :class:`SettingsError` naming the first bad setting. A root that is given (by flag,
    environment or file) must have an existing parent; the default root is held to that only
    when ``require_root`` (commands that never look at the tree, such as ``init-db``, pass
    False so that they work from any directory). ``flag_origins`` names where a flag value came
    from when that is not the command line (the Flask extension passes its config keys), so that
    an error names what the user actually wrote. Unknown ``FSWATCH_SYNC_*`` variables are
    logged as warnings.
    """
    flags = {key: value for key, value in (flags or {}).items() if value is not None}
    environ = os.environ if environ is None else environ
    unknown_flags = set(flags) - set(SPEC_BY_NAME)
    if unknown_flags:
        raise SettingsError(sorted(unknown_flags)[0], "is not a known setting")
    for message in unknown_environment(environ):
        log.warning("%s", message)

    path_text = config_path if config_path is not None else environ.get(CONFIG_ENV) or None
    file_values: dict[str, Any] = {}
    schema_table: dict[str, Any] = {}
    if path_text is not None:
        file_values = read_config_file(path_text)
        raw_schema = file_values.pop("schema", {})
        if not isinstance(raw_schema, dict):
            raise SettingsError("schema", "must be a TOML table ([schema])")
        schema_table = raw_schema
        for key in file_values:
            if key not in SPEC_BY_NAME:
                raise SettingsError(key, f"unknown key in {str(path_text)!r}")

    values: dict[str, Any] = {}
    for spec in SPECS:
        if spec.name in flags:
            raw, origin = flags[spec.name], (flag_origins or {}).get(spec.name, spec.flag)
        elif spec.env in environ:
            raw, origin = environ[spec.env], spec.env
        elif spec.name in file_values:
            raw, origin = file_values[spec.name], f"{spec.name} (config file)"
        elif (alias := next((a for a in spec.aliases if a in environ), None)) is not None:
            raw, origin = environ[alias], alias
        else:
            continue
        values[spec.name] = spec.parse(origin, raw)

    if "root" not in values:
        values["root"] = (
            SPEC_BY_NAME["root"].parse("root (default)", str(Settings.root))
            if require_root
            else Path(Settings.root).expanduser().absolute()
        )
    if "database_url" not in values:
        values["database_url"] = SPEC_BY_NAME["database_url"].parse(
            "database_url (default)", Settings.database_url
        )
    values["schema"] = SchemaConfig.from_mapping(schema_table)
    settings = Settings(**values)
    if settings.http:
        host, _ = parse_bind("http", settings.http)
        if not is_loopback(host) and not settings.http_token:
            raise SettingsError(
                "http", f"binding {host!r} beyond loopback needs FSWATCH_SYNC_HTTP_TOKEN"
            )
    return settings


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as plain JSON-able values, secrets hidden."""
    described: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if item.name == "database_url":
            value = settings.redacted_database_url()
        elif item.name in SECRET_SETTINGS:
            value = "***" if value else ""
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, SchemaConfig):
            value = value.describe()
        described[item.name] = value
    return described
