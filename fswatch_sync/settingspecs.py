"""The table of settings: each one's name, environment variable, flag, seed-system aliases and
help, with the parser that turns a raw value (a string from a flag or the environment, or a
TOML value) into a valid one or a one-line SettingsError naming where the value came from.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fswatch_sync.dburl import check_database_url
from fswatch_sync.errors import SettingsError

ENV_PREFIX = "FSWATCH_SYNC_"
OBSERVER_KINDS = ("auto", "native", "polling")

Parser = Callable[[str, Any], Any]


def _number(setting: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise SettingsError(setting, f"{raw!r} is not a number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise SettingsError(setting, f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise SettingsError(setting, f"{raw!r} is not a finite number")
    return value


def _non_negative(setting: str, raw: Any) -> float:
    value = _number(setting, raw)
    if value < 0:
        raise SettingsError(setting, f"{raw!r} is negative; use 0 or more")
    return value


def _positive(setting: str, raw: Any) -> float:
    value = _number(setting, raw)
    if value <= 0:
        raise SettingsError(setting, f"{raw!r} must be greater than 0")
    return value


def _fraction(setting: str, raw: Any) -> float:
    value = _number(setting, raw)
    if not 0 <= value <= 1:
        raise SettingsError(setting, f"{raw!r} must be between 0 and 1")
    return value


def _positive_int(setting: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise SettingsError(setting, f"{raw!r} is not a whole number")
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise SettingsError(setting, f"{raw!r} is not a whole number") from None
    if value < 1:
        raise SettingsError(setting, f"{raw!r} must be 1 or more")
    return value


# The longest duration a setting may name. Past about a century ``now - timedelta(...)`` leaves
# the calendar and a thread's wait overflows: the value would surface as a traceback at run
# time, so it is refused here with the one-line message instead.
MAX_DURATION_YEARS = 100
_MAX_DURATION_SECONDS = MAX_DURATION_YEARS * 365.25 * 86_400
# A batch binds two parameters per app; PostgreSQL allows 65,535 in one statement.
MAX_BATCH_SIZE = 10_000
MAX_PENDING_EVENTS = 10_000_000


def _duration(parse: Parser, unit_seconds: float) -> Parser:
    """``parse``, then refuse a duration (in units of ``unit_seconds``) over the maximum."""

    def parse_duration(setting: str, raw: Any) -> float:
        value = float(parse(setting, raw))
        if value * unit_seconds > _MAX_DURATION_SECONDS:
            raise SettingsError(
                setting, f"{raw!r} is too large (at most {MAX_DURATION_YEARS} years)"
            )
        return value

    return parse_duration


def _int_at_most(maximum: int) -> Parser:
    def parse_int(setting: str, raw: Any) -> int:
        value = _positive_int(setting, raw)
        if value > maximum:
            raise SettingsError(setting, f"{raw!r} is too large (at most {maximum:,})")
        return value

    return parse_int


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _boolean(setting: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError(setting, f"{raw!r} is not a boolean (use true or false)")


def _text(setting: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise SettingsError(setting, f"{raw!r} is not a string")
    if "\x00" in raw:
        raise SettingsError(setting, "contains a NUL character")
    return raw


def _root(setting: str, raw: Any) -> Path:
    text = _text(setting, raw)
    if not text.strip():
        raise SettingsError(setting, "is empty")
    path = Path(text).expanduser().absolute()
    if not path.parent.is_dir():
        raise SettingsError(setting, f"the parent directory {str(path.parent)!r} does not exist")
    return path


def _database_url(setting: str, raw: Any) -> str:
    text = _text(setting, raw)
    check_database_url(setting, text)
    return text


def _observer(setting: str, raw: Any) -> str:
    text = _text(setting, raw).strip().lower()
    if text not in OBSERVER_KINDS:
        raise SettingsError(setting, f"{raw!r} is not one of {', '.join(OBSERVER_KINDS)}")
    return text


def _marker(setting: str, raw: Any) -> str:
    text = _text(setting, raw)
    if text and (text in (".", "..") or "/" in text or os.sep in text):
        raise SettingsError(setting, f"{raw!r} must be a plain file name inside the root")
    return text


def _http(setting: str, raw: Any) -> str:
    text = _text(setting, raw).strip()
    if text:
        parse_bind(setting, text)
    return text


def parse_bind(setting: str, text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6) into a host and a port number.

    Port 0 asks the system for a free port (the one chosen is logged)."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise SettingsError(setting, f"{text!r} is not HOST:PORT")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_level(setting: str, raw: Any) -> str:
    text = _text(setting, raw).strip().upper()
    if text not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SettingsError(setting, f"{raw!r} is not a log level")
    return text


@dataclass(frozen=True)
class SettingSpec:
    name: str
    parse: Parser
    aliases: tuple[str, ...] = ()
    help: str = ""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SPECS: tuple[SettingSpec, ...] = (
    SettingSpec("root", _root, help="directory holding {model_slug}/app{N}/"),
    SettingSpec("database_url", _database_url, help="SQLAlchemy database URL"),
    SettingSpec(
        "interval_seconds",
        _duration(_positive, 1),
        ("MAINTENANCE_INTERVAL_SECONDS",),
        "seconds between periodic sweeps",
    ),
    SettingSpec(
        "running_timeout_minutes",
        _duration(_non_negative, 60),
        ("MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES",),
        "a running task older than this is failed",
    ),
    SettingSpec(
        "pending_timeout_minutes",
        _duration(_non_negative, 60),
        ("MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES",),
        "a pending task older than this is cancelled",
    ),
    SettingSpec(
        "task_retention_days",
        _duration(_non_negative, 86_400),
        ("MAINTENANCE_TASK_RETENTION_DAYS",),
        "terminal tasks completed longer ago are deleted",
    ),
    SettingSpec(
        "journal_retention_days",
        _duration(_non_negative, 86_400),
        help="the sweep deletes journal entries older than this (0: keeps them all)",
    ),
    SettingSpec(
        "app_grace_minutes",
        _duration(_non_negative, 60),
        help="the sweep ignores younger app rows",
    ),
    SettingSpec(
        "missing_grace_minutes",
        _duration(_non_negative, 60),
        help="mark an app whose directory is gone and delete its rows only after this"
        " (0: delete at once)",
    ),
    SettingSpec(
        "cancel_tasks_when_missing",
        _boolean,
        help="with a missing grace: cancel a marked app's active tasks at once",
    ),
    SettingSpec("cleanup_orphan_apps", _boolean, help="run the orphan-apps pass"),
    SettingSpec("cleanup_orphan_tasks", _boolean, help="run the orphan-tasks pass"),
    SettingSpec("cleanup_stuck_tasks", _boolean, help="run the stuck-tasks pass"),
    SettingSpec("cleanup_old_tasks", _boolean, help="run the old-tasks pass"),
    SettingSpec(
        "max_delete_fraction", _fraction, help="largest fraction of app rows one sweep may delete"
    ),
    SettingSpec(
        "enabled", _boolean, ("MAINTENANCE_ENABLED",), "run the periodic sweep in the daemon"
    ),
    SettingSpec(
        "batch_size", _int_at_most(MAX_BATCH_SIZE), help="rows changed by the first transaction"
    ),
    SettingSpec(
        "max_transaction_ms",
        _duration(_positive, 0.001),
        help="time budget of one write transaction; batches grow or shrink to fit it",
    ),
    SettingSpec("observer", _observer, help="auto, native (inotify...) or polling"),
    SettingSpec(
        "polling_interval_seconds", _duration(_positive, 1), help="polling observer's period"
    ),
    SettingSpec(
        "settle_ms",
        _duration(_non_negative, 0.001),
        help="coalescing window for bursts of events",
    ),
    SettingSpec(
        "max_pending_events",
        _int_at_most(MAX_PENDING_EVENTS),
        help="queued app keys before a sweep",
    ),
    SettingSpec("root_marker", _marker, help="file that must exist in the root (empty: none)"),
    SettingSpec("lease_seconds", _duration(_positive, 1), help="maintenance lease duration"),
    SettingSpec(
        "heartbeat_seconds", _duration(_positive, 1), help="how often an instance records itself"
    ),
    SettingSpec("sweep_jitter_fraction", _fraction, help="random spread of the sweep period"),
    SettingSpec("http", _http, help="HOST:PORT for the HTTP endpoint (empty: off)"),
    SettingSpec("http_token", _text, help="bearer token for POST /sweep"),
    SettingSpec("log_level", _log_level, help="DEBUG, INFO, WARNING or ERROR"),
)

SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
# Never a command-line flag (argv is visible to every user) and never shown in clear.
SECRET_SETTINGS = frozenset({"http_token"})
