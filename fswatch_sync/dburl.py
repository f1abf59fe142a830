"""Database URLs: hiding their secrets for logs and output, and checking one before it is used.

The check imports the URL's driver and matches its query options against what the driver takes,
so that a missing package or a mistyped option is a one-line settings error at start-up, not a
traceback at the first connection.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from fswatch_sync.errors import SettingsError

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


def check_database_url(setting: str, text: str) -> None:
    """Refuse a URL SQLAlchemy cannot parse, whose driver is missing or refuses its query
    options, or (SQLite) whose database file would sit in a directory that does not exist."""
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise SettingsError(setting, "is not a valid SQLAlchemy database URL") from None
    _check_driver(setting, url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        parent = Path(url.database).expanduser().absolute().parent
        if not parent.is_dir():
            raise SettingsError(setting, f"the directory {str(parent)!r} does not exist")
