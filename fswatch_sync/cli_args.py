"""The command line's surface: its name, its exit statuses, the parser of every command and
what the parsed arguments mean (the settings, a journal selection, a time).

The exit statuses are here, below the commands and :func:`fswatch_sync.cli.main`, because the
parser itself exits with one (2, on a usage error).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from fswatch_sync import __version__, db, journal
from fswatch_sync.errors import SettingsError
from fswatch_sync.layout import is_safe_slug, parse_app_dir_name
from fswatch_sync.settings import Settings, load_settings
from fswatch_sync.settingspecs import SECRET_SETTINGS, SPECS

PROG = "fswatch-sync"
EXIT_OK, EXIT_FAILURE, EXIT_SETTINGS, EXIT_REFUSED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other bad input
        self.exit(EXIT_SETTINGS, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """The command line asks for something that does not make sense (exit 2)."""


_ALL_SETTINGS = frozenset(spec.name for spec in SPECS)
# What only the long-running service reads: the sweep reads every other setting (so that a
# setting added later reaches the sweep's --help unless it is put here).
_DAEMON_ONLY = frozenset({
    "interval_seconds", "enabled", "observer", "polling_interval_seconds", "settle_ms",
    "max_pending_events", "heartbeat_seconds", "sweep_jitter_fraction", "http", "http_token",
})
# The settings each command reads, so that its --help lists only flags that change something
# for it (the environment and the file may set any of them: they are shared with the daemon).
COMMAND_SETTINGS: dict[str, frozenset[str]] = {
    "run": _ALL_SETTINGS,
    "sweep": _ALL_SETTINGS - _DAEMON_ONLY,
    "status": frozenset({"root", "database_url", "heartbeat_seconds", "log_level"}),
    "init-db": frozenset({"database_url", "log_level"}),
    "db": frozenset({"database_url", "log_level"}),
    "journal": frozenset({"database_url", "log_level"}),
    "restore": frozenset({"root", "database_url", "log_level"}),
}


def _settings_parent(command: str) -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("settings (flag > environment > config file > default)")
    group.add_argument("--config", metavar="PATH", help="TOML settings file (FSWATCH_SYNC_CONFIG)")
    for spec in SPECS:
        if spec.name in SECRET_SETTINGS:
            continue  # secrets come from the environment or the file, never argv
        # A flag the command does not read is still accepted (a wrapper may pass one set of
        # flags to every command) but left out of its --help.
        used = spec.name in COMMAND_SETTINGS[command]
        group.add_argument(
            spec.flag, dest=f"setting_{spec.name}", metavar="VALUE", default=None,
            help=f"{spec.help} ({spec.env})" if used else argparse.SUPPRESS,
        )
    return parent


def _count(text: str) -> int:
    """``--limit``: a whole number, 0 or more (0: no limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; use 0 (no limit) or more")
    return value


JOURNAL_LIMIT = 50


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, description="Keep app rows and tasks in step with a directory tree."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, parents=[_settings_parent(name)], help=text, description=text
        )

    command("run", "run the daemon: start-up sweep, then watch and sweep periodically")

    sweep = command("sweep", "one full reconciliation pass, then exit")
    sweep.add_argument(
        "--dry-run", action="store_true", help="change nothing; report what a run would do"
    )
    sweep.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sweep.add_argument(
        "--force", action="store_true",
        help="pass the mass-deletion fraction (never a missing or empty root)",
    )
    sweep.add_argument(
        "--allow-empty-root", action="store_true",
        help="sweep a root that holds no app directory while app rows exist (the apps are"
        " really gone, not an unmounted volume)",
    )
    sweep.add_argument(
        "--force-model", action="append", default=[], metavar="SLUG",
        help="sweep this model directory although it proves nothing (another device, or no app"
        " while rows exist); repeatable",
    )
    sweep.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)

    status = command("status", "live instances and recent sweeps, read from the database")
    status.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    command("init-db", "create the tables (idempotent)")

    database = commands.add_parser(
        "db", help="the tool's own tables: migrations", description="the tool's own tables"
    )
    database_commands = database.add_subparsers(
        dest="db_command", required=True, help="what to do with them"
    )
    upgrade_text = "bring the tool's own tables to the newest revision (after every upgrade)"
    upgrade = database_commands.add_parser(
        "upgrade", parents=[_settings_parent("db")], help=upgrade_text, description=upgrade_text
    )
    upgrade.add_argument("revision", nargs="?", default="head", help="target (default: head)")

    listing = command("journal", "list recorded changes, newest first")
    listing.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    listing.add_argument(
        "--limit", type=_count, default=JOURNAL_LIMIT, metavar="N",
        help=f"show at most N entries (default {JOURNAL_LIMIT}; 0 shows every entry)",
    )
    _add_selection(listing)
    listing.add_argument("--all", action="store_true", help="include entries already restored")

    restore = command("restore", "undo recorded changes (all or nothing)")
    _add_selection(restore)
    restore.add_argument(
        "--dry-run", action="store_true", help="check and count; change nothing"
    )
    restore.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", action="append", default=[], metavar="N[,N|N-M]",
                        help="journal entry ids (repeatable)")
    parser.add_argument("--batch", metavar="UUID", help="every entry of one transaction")
    parser.add_argument("--since", metavar="ISO", help="entries at or after this UTC time")
    parser.add_argument("--until", metavar="ISO", help="entries at or before this UTC time")
    parser.add_argument("--app", metavar="SLUG/appN", help="only entries of this app")
    parser.add_argument("--action", choices=journal.RESTORABLE, metavar="ACTION",
                        help=f"only entries of this action: {', '.join(journal.RESTORABLE)}")


# One --id range may name this many ids at most: a typo like 1-999999999 must not fill memory.
MAX_ID_RANGE = 100_000


def _check_ids(texts: Sequence[str]) -> None:
    for text in texts:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            if not dash:
                continue
            if not (low.isdigit() and high.isdigit()):
                raise UsageError(f"--id: {part.strip()!r} is not a range N-M")
            if int(low) > int(high):
                raise UsageError(f"--id: {part.strip()!r} is backwards; write {high}-{low}")
            if int(high) - int(low) >= MAX_ID_RANGE:
                raise UsageError(
                    f"--id: {part.strip()!r} spans more than {MAX_ID_RANGE:,} ids;"
                    " use --since/--until or --batch"
                )


def parse_time(setting: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return db.from_db_time(datetime.fromisoformat(text))
    except ValueError:
        raise SettingsError(setting, f"{text!r} is not an ISO date/time") from None


def selection_from(args: argparse.Namespace) -> journal.Selection:
    _check_ids(args.id)
    try:
        ids = journal.parse_ids(args.id)
    except ValueError:
        raise SettingsError("--id", f"{args.id!r} is not a list of journal ids") from None
    app = None
    if args.app:
        slug, _, name = args.app.rpartition("/")
        number = parse_app_dir_name(name)
        if number is None or not is_safe_slug(slug):
            raise SettingsError("--app", f"{args.app!r} is not SLUG/appN")
        app = (slug, number)
    return journal.Selection(
        ids=ids,
        batch_id=args.batch,
        since=parse_time("--since", args.since),
        until=parse_time("--until", args.until),
        app=app,
        action=args.action,
        include_restored=getattr(args, "all", False),
    )


# Only these look at the directory tree; the others work from any directory on the defaults.
_COMMANDS_USING_ROOT = frozenset({"run", "sweep"})


def settings_from(
    args: argparse.Namespace,
    base_flags: Mapping[str, Any] | None = None,
    base_origins: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from argv flags, then ``base_flags`` (a host app's config, named in errors as
    ``base_origins`` says), env, file, default."""
    flags = dict(base_flags or {})
    config_path = flags.pop("config", None)
    from_argv = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    flags.update(from_argv)
    origins = {k: v for k, v in (base_origins or {}).items() if k not in from_argv}
    return load_settings(
        flags,
        config_path=args.config or config_path,
        require_root=args.command in _COMMANDS_USING_ROOT,
        flag_origins=origins,
    )
