"""The Settings value and where it comes from.

Every setting resolves in one place as: command-line flag, else environment, else the TOML file,
else the default. The seed system's ``MAINTENANCE_*`` variables are honoured as a fallback just
above the default: a setting given under its own name anywhere (flag, ``FSWATCH_SYNC_*``
variable or the TOML file) wins over the legacy alias, so ``MAINTENANCE_STUCK_TASK_TIMEOUT_MINUTES``
sets both timeouts unless the specific ones are set.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import ipaddress
import logging
import math
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from fswatch_sync.errors import SettingsError
from fswatch_sync.schema import SchemaConfig

log = logging.getLogger(__name__)

ENV_PREFIX = "FSWATCH_SYNC_"
CONFIG_ENV = "FSWATCH_SYNC_CONFIG"
OBSERVER_KINDS = ("auto", "native", "polling")
# Variables of this project's own test, benchmark and fault tooling: not settings, not typos.
_TOOLING_ENV_PREFIXES = ("FSWATCH_SYNC_TEST_", "FSWATCH_SYNC_BENCH_", "FSWATCH_SYNC_FAULT_")
_TOOLING_ENV = frozenset({
    "FSWATCH_SYNC_CHILD", "FSWATCH_SYNC_REQUIRE_DATABASES", "FSWATCH_SYNC_RELIABILITY_COMMAND",
})
# A settings file is a few kilobytes; the cap keeps /dev/zero or a huge file from eating memory.
MAX_CONFIG_BYTES = 1024 * 1024


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


# Query options that carry a secret in some driver's URL syntax (libpq's password and
# sslpassword, PyMySQL's passwd, ssl_key_password, ...), matched as substrings of the key.
_SECRET_QUERY_WORDS = ("pass", "pwd", "secret", "token", "credential", "key")


def redact_url(url: str) -> str:
    """The URL with every password hidden: the userinfo one and any in the query string."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<unparsable database URL>"
    query = {
        key: ("***" if any(word in key.lower() for word in _SECRET_QUERY_WORDS) else value)
        for key, value in parsed.query.items()
    }
    rendered = parsed.set(query=query).render_as_string(hide_password=True)
    return rendered.replace("=%2A%2A%2A", "=***")


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


# The drivers this package has an extra for, by backend.
_EXTRAS = {"postgresql": ("psycopg", "postgres"), "mysql": ("pymysql", "mysql"),
           "mariadb": ("pymysql", "mysql")}


def _missing_driver(setting: str, url: URL, module: str | None) -> SettingsError:
    # From the text: asking the URL would load the very dialect that is missing.
    shown = url.drivername
    backend, _, driver = shown.partition("+")
    if backend in _EXTRAS:
        ours, extra = _EXTRAS[backend]
        hint = f"pip install 'fswatch_sync[{extra}]'"
        if driver != ours:
            hint = f"use {backend}+{ours}:// and {hint}, or install {driver}"
    elif driver:
        hint = f"install the {driver} driver"
    else:
        hint = f"{backend!r} is not a database SQLAlchemy knows"
    missing = f" ({module} is not installed)" if module else ""
    return SettingsError(setting, f"no driver for {shown!r}{missing}: {hint}")


def _check_driver(setting: str, url: URL) -> None:
    """Import the URL's driver and check its query options against what the driver accepts,
    so that neither a missing package nor a mistyped option surfaces as a traceback later."""
    try:
        dialect_cls = url.get_dialect()
    except NoSuchModuleError:
        raise _missing_driver(setting, url, None) from None
    try:
        dbapi = dialect_cls.import_dbapi()
    except ImportError as exc:
        raise _missing_driver(setting, url, exc.name) from None
    if not url.query:
        return
    try:
        parameters = list(inspect.signature(dbapi.connect).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature (sqlite3): not checkable
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # the driver takes any option and names a wrong one itself
    try:
        dialect: Any = dialect_cls(dbapi=dbapi)  # type: ignore[call-arg]
        _args, kwargs = dialect.create_connect_args(url)
    except (TypeError, ValueError) as exc:
        raise SettingsError(setting, f"bad query option: {exc}") from None
    accepted = {p.name for p in parameters}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(
            setting, f"query option {unknown[0]!r} is not known to {url.get_driver_name()}{hint}"
        )


def _database_url(setting: str, raw: Any) -> str:
    text = _text(setting, raw)
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise SettingsError(setting, "is not a valid SQLAlchemy database URL") from None
    _check_driver(setting, url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        parent = Path(url.database).expanduser().absolute().parent
        if not parent.is_dir():
            raise SettingsError(setting, f"the directory {str(parent)!r} does not exist")
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

_SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
# Never a command-line flag (argv is visible to every user) and never shown in clear.
SECRET_SETTINGS = frozenset({"http_token"})


def _read_config_bytes(path: Path) -> bytes:
    shown = repr(str(path))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SettingsError("config", f"file {shown} does not exist") from None
    except OSError as exc:
        raise SettingsError("config", f"cannot read {shown}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SettingsError("config", f"{shown} is not a regular file")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise SettingsError(
                    "config", f"{shown} is larger than {MAX_CONFIG_BYTES // 1024} KiB"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise SettingsError("config", f"cannot read {shown}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TOML settings file as a table; SettingsError (one line) for anything unusable."""
    path = Path(path)
    data = _read_config_bytes(path)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SettingsError("config", f"{str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError("config", f"{str(path)!r} is not valid TOML: {exc}") from None
    except RecursionError:
        raise SettingsError("config", f"{str(path)!r} nests tables or arrays too deeply") from None


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``FSWATCH_SYNC_*`` variables that name no setting: each a likely typo, said once."""
    known = {spec.env for spec in SPECS} | {CONFIG_ENV} | _TOOLING_ENV
    messages = []
    for name in sorted(environ):
        if (
            not name.startswith(ENV_PREFIX)
            or name in known
            or name.startswith(_TOOLING_ENV_PREFIXES)
        ):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        messages.append(f"environment variable {name} is not a setting; ignored{hint}")
    return messages


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
    unknown_flags = set(flags) - set(_SPEC_BY_NAME)
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
            if key not in _SPEC_BY_NAME:
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
            _root("root (default)", str(Settings.root))
            if require_root
            else Path(Settings.root).expanduser().absolute()
        )
    if "database_url" not in values:
        values["database_url"] = _database_url("database_url (default)", Settings.database_url)
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
