"""The Flask extension.

    from fswatch_sync.flask import FswatchSync

    fswatch = FswatchSync()

    def create_app():
        app = Flask(__name__)
        app.config["FSWATCH_SYNC_ROOT"] = "generated/apps"
        fswatch.init_app(app)
        return app

Settings come from ``app.config`` keys ``FSWATCH_SYNC_<SETTING>`` (``FSWATCH_SYNC_ROOT``,
``FSWATCH_SYNC_DATABASE_URL``, ...), then the environment, the TOML file
(``FSWATCH_SYNC_CONFIG``) and the defaults. Without a database URL anywhere, the app's
``SQLALCHEMY_DATABASE_URI`` is used.

When it starts: with the first request a worker handles (``FSWATCH_SYNC_AUTOSTART``, default
True), or when ``fswatch.start()`` is called. Starting lazily is what keeps it safe: the debug
reloader's parent process and ``flask ...`` commands never handle a request, so they never start
a second copy; under gunicorn each worker starts its own, and only the lease holder sweeps.
Do not call ``start()`` before a fork (``preload_app``): threads do not survive it. The lazy start
never fails a request: if starting fails, the error is logged, the request goes on, and a later
request tries again after ``AUTOSTART_RETRY_SECONDS``. Once started or stopped (``fswatch.stop()``),
requests never start it again.

Commands: ``flask fswatch-sync sweep|status|journal|restore|init-db|db upgrade ...`` take the
same options as the ``fswatch-sync`` command, with the app's configuration as their defaults.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from fswatch_sync import cli
from fswatch_sync.errors import SettingsError
from fswatch_sync.service import Service
from fswatch_sync.settings import load_settings
from fswatch_sync.settingsources import CONFIG_ENV, read_config_file
from fswatch_sync.settingspecs import SPECS

log = logging.getLogger(__name__)

EXTENSION_KEY = "fswatch_sync"
CONFIG_PREFIX = "FSWATCH_SYNC_"
AUTOSTART_RETRY_SECONDS = 60.0
_EXTRA_KEYS = frozenset({CONFIG_PREFIX + "CONFIG", CONFIG_PREFIX + "AUTOSTART"})


def _file_sets(path: str | None, name: str) -> bool:
    """Whether the TOML settings file sets ``name`` (an unreadable file is load_settings' to
    report)."""
    if not path:
        return False
    try:
        return name in read_config_file(path)
    except SettingsError:
        return False


def config_origins(app: Flask) -> dict[str, str]:
    """What an error names for each setting the app's configuration gives: its config key."""
    return {
        spec.name: f"{CONFIG_PREFIX}{spec.name.upper()} (Flask config)"
        for spec in SPECS
        if app.config.get(CONFIG_PREFIX + spec.name.upper()) is not None
    }


def config_flags(app: Flask) -> dict[str, Any]:
    """The settings the app's configuration gives, as flag-level values."""
    known = {CONFIG_PREFIX + spec.name.upper() for spec in SPECS} | _EXTRA_KEYS
    for key in app.config:
        if key.startswith(CONFIG_PREFIX) and key not in known:
            raise SettingsError(key, "is not a known fswatch_sync setting")
    flags: dict[str, Any] = {}
    for spec in SPECS:
        value = app.config.get(CONFIG_PREFIX + spec.name.upper())
        if value is not None:
            flags[spec.name] = value if isinstance(value, str | bool) else str(value)
    if app.config.get(CONFIG_PREFIX + "CONFIG"):
        flags["config"] = str(app.config[CONFIG_PREFIX + "CONFIG"])
    has_url = (
        "database_url" in flags
        or (CONFIG_PREFIX + "DATABASE_URL") in os.environ
        or _file_sets(flags.get("config") or os.environ.get(CONFIG_ENV), "database_url")
    )
    if not has_url and app.config.get("SQLALCHEMY_DATABASE_URI"):
        flags["database_url"] = str(app.config["SQLALCHEMY_DATABASE_URI"])
    return flags


class FswatchSync:
    """Keeps the app's rows in step with its directory tree, from inside the app."""

    def __init__(self, app: Flask | None = None, *, autostart: bool | None = None) -> None:
        self._autostart = autostart
        self._lock = threading.Lock()
        # Services that requests must not start any more (started once, or stopped), and when a
        # failed lazy start may be tried again.
        self._settled: weakref.WeakSet[Service] = weakref.WeakSet()
        self._retry_at: weakref.WeakKeyDictionary[Service, float] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "fswatch_sync is already registered on this app; call init_app once per app"
            )
        app.config.setdefault(CONFIG_PREFIX + "AUTOSTART", True)
        flags = config_flags(app)
        config_path = flags.pop("config", None)
        settings = load_settings(flags, config_path=config_path, flag_origins=config_origins(app))
        service = Service(settings)
        app.extensions[EXTENSION_KEY] = service
        app.cli.add_command(_command_group())
        autostart = (
            self._autostart if self._autostart is not None
            else bool(app.config[CONFIG_PREFIX + "AUTOSTART"])
        )
        if autostart:
            app.before_request(lambda: self._start_lazily(service))

    def _start_lazily(self, service: Service) -> None:
        """Before a request: start once; a failure is logged and never fails the request."""
        if service in self._settled:
            return
        with self._lock:
            if service in self._settled or time.monotonic() < self._retry_at.get(service, 0.0):
                return
            try:
                self._start_locked(service)
            except SettingsError as exc:
                # A mapping or setting that cannot work will not work on the next request
                # either: said once, and the app goes on without the service.
                self._settled.add(service)
                log.error("fswatch_sync is not started: %s", exc)
            except Exception:
                self._retry_at[service] = time.monotonic() + AUTOSTART_RETRY_SECONDS
                log.exception(
                    "fswatch_sync could not start; the app goes on without it (next try in %.0fs)",
                    AUTOSTART_RETRY_SECONDS,
                )

    def _start_locked(self, service: Service) -> None:
        if not service.running:
            service.start()
            atexit.register(service.stop)
        self._settled.add(service)

    def service(self, app: Flask | None = None) -> Service:
        target = app or current_app
        service = target.extensions.get(EXTENSION_KEY)
        if not isinstance(service, Service):
            raise RuntimeError("fswatch_sync is not registered on this app (call init_app)")
        return service

    def start(self, app: Flask | None = None) -> Service:
        """Start now (for example in a gunicorn post_worker_init hook); errors are raised."""
        service = self.service(app)
        with self._lock:
            self._start_locked(service)
        return service

    def stop(self, app: Flask | None = None) -> None:
        """Stop the service; later requests do not start it again."""
        service = self.service(app)
        with self._lock:
            self._settled.add(service)
        service.stop()


def _command_group() -> click.Group:
    group = AppGroup("fswatch-sync", help="Reconcile app rows and tasks with the directory tree.")
    for name in ("sweep", "status", "journal", "restore", "init-db", "db"):
        group.add_command(_passthrough(name))
    return group


def _passthrough(name: str) -> click.Command:
    @click.command(
        name,
        context_settings={"ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
        help=f"Same as 'fswatch-sync {name}', with the app's configuration.",
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @with_appcontext
    def command(args: tuple[str, ...]) -> None:
        # The command sets up the tool's logger for itself; the host's logging is put back.
        logger = logging.getLogger("fswatch_sync")
        saved = logger.handlers[:], logger.level, logger.propagate
        try:
            code = cli.main(
                [name, *args],
                base_flags=config_flags(current_app),
                base_origins=config_origins(current_app),
                prog="flask fswatch-sync",
            )
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
        sys.stdout.flush()
        if code:
            raise SystemExit(code)

    return command
