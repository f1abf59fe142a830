"""The ``fswatch-sync`` command line: argument parsing and human/JSON output only.

Exit status: 0 success, 1 failure (including a database that is missing or has no tables for a
command that only reads), 2 bad settings or usage, 3 the sweep's guard refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn, TextIO

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from fswatch_sync import __version__, db, journal, migrations, records
from fswatch_sync.dburl import redact_url
from fswatch_sync.errors import (
    FswatchSyncError,
    LeaseUnavailable,
    RestoreConflict,
    SettingsError,
    SweepRefused,
)
from fswatch_sync.layout import is_safe_slug, parse_app_dir_name
from fswatch_sync.schema import tool_metadata
from fswatch_sync.settings import Settings, load_settings
from fswatch_sync.settingspecs import SECRET_SETTINGS, SPECS
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper, SweepReport
from fswatch_sync.text import first_line, printable

PROG = "fswatch-sync"
EXIT_OK, EXIT_FAILURE, EXIT_SETTINGS, EXIT_REFUSED = 0, 1, 2, 3
log = logging.getLogger("fswatch_sync")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other bad input
        self.exit(EXIT_SETTINGS, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """The command line asks for something that does not make sense (exit 2)."""


class DatabaseNotReady(FswatchSyncError):
    """A command that only reads found no database, or none of the tool's tables (exit 1)."""


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


def _time(setting: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return db.from_db_time(datetime.fromisoformat(text))
    except ValueError:
        raise SettingsError(setting, f"{text!r} is not an ISO date/time") from None


def _selection(args: argparse.Namespace) -> journal.Selection:
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
        since=_time("--since", args.since),
        until=_time("--until", args.until),
        app=app,
        action=args.action,
        include_restored=getattr(args, "all", False),
    )


class _OneLineFormatter(logging.Formatter):
    """Each record's message on one line, whatever name or error text went into it (only a
    traceback, appended after the message, spans lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fswatch_sync")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# Only these look at the directory tree; the others work from any directory on the defaults.
_COMMANDS_USING_ROOT = frozenset({"run", "sweep"})


def _settings_from(
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


_opened: list[Any] = []  # engines a command opened; main() closes their pools when it ends


def open_store(settings: Settings) -> Store:
    store = Store.from_settings(settings)
    _opened.append(store.engine)
    return store


_INIT_HINT = "run 'fswatch-sync init-db' (or start 'fswatch-sync run') first"


def open_existing_store(settings: Settings) -> Store:
    """The store of a database that already holds the tool's tables; creates nothing.

    Read-only commands use it: a mistyped SQLite path must not leave a new empty database
    behind, and reading must never create tables."""
    url = sa.make_url(settings.database_url)
    shown = redact_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        uri = str(url.query.get("uri", "")).lower() in ("1", "true")
        if not uri and not os.path.isfile(url.database):
            raise DatabaseNotReady(f"no database at {url.database!r} ({shown}); {_INIT_HINT}")
    store = open_store(settings)
    present = set(sa.inspect(store.engine).get_table_names())
    missing = [name for name in tool_metadata.tables if name not in present]
    if missing:
        raise DatabaseNotReady(
            f"{shown} has no {', '.join(sorted(missing))} table"
            f"{'s' if len(missing) > 1 else ''}; {_INIT_HINT}"
        )
    return store


def _print_table(rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    if not rows:
        return
    # A name may hold a newline or a terminal escape: one table row is one line, whatever it holds.
    shown = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in shown) for i in range(len(rows[0]))]
    for row in shown:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


def _stderr_progress(label: str, done: int, total: int) -> None:
    if total:
        sys.stderr.write(f"\r{label}: {done}/{total}  ")
        if done >= total:
            sys.stderr.write("\n")
    else:
        sys.stderr.write(f"{label}...\n")
    sys.stderr.flush()


def cmd_sweep(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = open_store(settings)
    if not args.dry_run:
        store.ensure_tool_tables()
    progress = _stderr_progress if sys.stderr.isatty() and not args.json else None
    sweeper = Sweeper(
        store, settings, instance_id=f"cli-{records.new_instance_id()}", progress=progress
    )
    now = _time("--now", args.now)
    try:
        report = sweeper.run(
            now=now, dry_run=args.dry_run, force=args.force, trigger="manual",
            allow_empty_root=args.allow_empty_root, force_models=args.force_model,
        )
        code = EXIT_OK
    except SweepRefused as exc:
        refused = getattr(exc, "report", None)
        report = (
            refused if isinstance(refused, SweepReport)
            else SweepReport(dry_run=args.dry_run, forced=args.force, refused=str(exc))
        )
        code = EXIT_REFUSED
        sys.stderr.write(f"{PROG}: refused: {printable(str(exc))}\n")
    if args.json:
        out.write(json.dumps(report.to_dict()) + "\n")
    elif code == EXIT_OK:
        rows = [
            ("orphan apps", report.orphan_apps),
            ("orphan tasks", report.orphan_tasks),
            ("stuck tasks", f"{report.stuck_tasks} ({report.stuck_running} running failed,"
                            f" {report.stuck_pending} pending cancelled)"),
            ("old tasks", report.old_tasks),
        ]
        if report.blocked_apps:
            rows.append(("blocked apps", f"{report.blocked_apps} (kept by a restrict policy)"))
        if report.journal_pruned:
            rows.append(("journal entries", f"{report.journal_pruned} past the retention deleted"))
        if report.untrusted_models:
            rows.append(("left alone", f"{report.untrusted_rows} rows of "
                         + ", ".join(printable(slug) for slug in report.untrusted_models)
                         + " (model directory proves nothing; --force-model SLUG)"))
        rows.append(("took", f"{report.duration_seconds:.2f}s"))
        _print_table(rows, out)
        if report.dry_run:
            out.write("dry run: nothing was changed\n")
    return code


def cmd_init_db(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = open_store(settings)
    existing = set(sa.inspect(store.engine).get_table_names())
    # The tool's tables go through their migrations, so the database is at a recorded revision
    # and a later 'db upgrade' knows where to start; then create_all adds the host tables.
    migrations.upgrade(store.engine)
    store.init_db()
    created = [t for t in sa.inspect(store.engine).get_table_names() if t not in existing]
    target = redact_url(settings.database_url)
    if created:
        out.write(f"created {', '.join(created)} in {target}\n")
    else:
        out.write(f"all tables already exist in {target}\n")
    return EXIT_OK


def cmd_db(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    engine = db.create_engine(settings.database_url)
    _opened.append(engine)
    result = migrations.upgrade(engine, args.revision)
    target = redact_url(settings.database_url)
    start = result.before or (
        f"{result.detected} (recognised, no revision recorded)" if result.detected else "empty"
    )
    if result.changed:
        out.write(f"upgraded fswatch_sync tables in {target}: {start} -> {result.after}\n")
    else:
        out.write(f"fswatch_sync tables in {target} already at {result.after}\n")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = open_existing_store(settings)
    now = db.utcnow()
    stale = timedelta(seconds=max(3 * settings.heartbeat_seconds, 30))
    found = records.instances(store.engine, now=now, stale_after=stale)
    sweeps = records.recent_sweeps(store.engine)
    lease_holder = records.Lease(store.engine, "status").current_holder()
    marked = store.count_marked()
    if args.json:
        out.write(json.dumps({
            "database": settings.redacted_database_url(),
            "root": str(settings.root),
            "instances": found,
            "sweeps": sweeps,
            "sweep_lease_holder": lease_holder,
            "apps_marked_missing": marked,
            "waiting_rows": _waiting_rows(found),
        }, default=str) + "\n")
        return EXIT_OK
    out.write(f"database  {printable(settings.redacted_database_url())}\n"
              f"root      {printable(str(settings.root))}\n")
    out.write(f"marked    {marked} app(s) missing, waiting out the missing-since grace\n\n"
              if marked else "\n")
    live = [i for i in found if i["live"]]
    out.write(f"instances ({len(live)} live)\n")
    _print_table(
        [("id", "state", "heartbeat", "live", "waiting rows")]
        + [(i["instance_id"], i["state"], i["heartbeat_at"], "yes" if i["live"] else "no",
            i["stats"].get("waiting_rows", 0)) for i in found[:10]],
        out,
    )
    waiting = _waiting_rows(found)
    if waiting:
        out.write(
            f"\n{waiting} app rows wait: their directories cannot be seen (root missing or"
            " empty, or an untrusted model directory); nothing removes them until it is back\n"
        )
    out.write("\nrecent sweeps\n")
    _print_table(
        [("id", "started", "trigger", "outcome", "apps", "orphan tasks", "stuck", "old")]
        + [(s["id"], s["started_at"], s["trigger"], s["outcome"], s["orphan_apps"],
            s["orphan_tasks"], s["stuck_tasks"], s["old_tasks"]) for s in sweeps],
        out,
    )
    return EXIT_OK


def _waiting_rows(found: Sequence[Mapping[str, Any]]) -> int:
    """Rows waiting for the tree, as the live instances last reported (they share one root)."""
    return max(
        (int(i["stats"].get("waiting_rows", 0) or 0) for i in found if i["live"]), default=0
    )


# ``--limit 0``: a bound every backend's LIMIT accepts and no journal reaches.
_NO_LIMIT = 2**62


def cmd_journal(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    selection = _selection(args)
    store = open_existing_store(settings)
    limit = args.limit or _NO_LIMIT
    entries = journal.list_entries(store.engine, selection, limit=min(limit + 1, _NO_LIMIT))
    truncated = len(entries) > limit
    entries = entries[:limit]
    if args.json:
        out.write(json.dumps(entries, default=str) + "\n")
    else:
        rows: list[tuple[Any, ...]] = [
            ("id", "at", "action", "source", "app", "status", "restored")
        ]
        for e in entries:
            app = f"{e['model_slug']}/app{e['app_number']}" if e["model_slug"] is not None else ""
            status = f"{e['old_status']} -> {e['new_status']}" if e["new_status"] else ""
            rows.append((e["id"], e["at"], e["action"], e["source"], app, status,
                         e["restored_at"] or ""))
        _print_table(rows, out)
        if not entries:
            out.write("no journal entries match\n")
    if truncated:
        sys.stderr.write(
            f"{PROG}: showing the newest {limit} entries; more match"
            " (--limit N shows more, --limit 0 all)\n"
        )
    return EXIT_OK


def _restored_apps(store: Store, selection: journal.Selection) -> list[tuple[str, int]]:
    """The apps whose removal a restore of ``selection`` puts back (entries not yet restored)."""
    if selection.action not in (None, "app_removed"):
        return []
    narrowed = journal.Selection(**{**selection.__dict__, "action": "app_removed",
                                    "include_restored": False})
    entries = journal.list_entries(store.engine, narrowed, limit=_NO_LIMIT)
    return sorted({(e["model_slug"], int(e["app_number"])) for e in entries
                   if e["model_slug"] is not None and e["app_number"] is not None})


def cmd_restore(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    selection = _selection(args)
    if not (selection.ids or selection.batch_id or selection.since or selection.until):
        narrowing = " and ".join(f for f, v in (("--app", args.app), ("--action", args.action))
                                 if v)
        raise UsageError(
            "restore needs entries chosen with --id, --batch or --since/--until"
            + (f" ({narrowing} only narrows that choice)" if narrowing else "")
        )
    store = open_existing_store(settings)
    apps = _restored_apps(store, selection)
    result = journal.restore(store, selection, dry_run=args.dry_run)
    missing = [
        f"{slug}/app{number}" for slug, number in apps
        if not (settings.root / slug / f"app{number}").is_dir()
    ]
    if args.json:
        out.write(json.dumps({"restored": result.restored, "by_action": result.by_action,
                              "dry_run": args.dry_run, "still_missing": missing}) + "\n")
    else:
        verb = "would restore" if args.dry_run else "restored"
        details = ", ".join(f"{n} {a}" for a, n in sorted(result.by_action.items()))
        out.write(f"{verb} {result.restored} entries ({details})\n")
    if missing:
        shown = ", ".join(printable(name) for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        log.warning(
            "%d restored app%s still ha%s no directory under %s (%s%s): the next sweep will"
            " remove %s again unless %s back",
            len(missing), "s" if len(missing) > 1 else "", "ve" if len(missing) > 1 else "s",
            settings.root, shown, more, "them" if len(missing) > 1 else "it",
            "they come" if len(missing) > 1 else "it comes",
        )
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from fswatch_sync.daemon import run_daemon

    return int(run_daemon(settings))


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, TextIO], int]] = {
    "sweep": cmd_sweep,
    "init-db": cmd_init_db,
    "db": cmd_db,
    "status": cmd_status,
    "journal": cmd_journal,
    "restore": cmd_restore,
    "run": cmd_run,
}


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    base_flags: Mapping[str, Any] | None = None,
    *,
    prog: str = PROG,
    base_origins: Mapping[str, str] | None = None,
) -> int:
    """Run one command; ``base_flags`` are settings a host app configured (argv flags win),
    ``base_origins`` the names its errors give them, ``prog`` the name usage lines show."""
    out = out or sys.stdout
    try:
        args = build_parser(prog).parse_args(argv)
        # Early, so that what loading the settings warns about is seen; set again below.
        configure_logging("INFO")
        settings = _settings_from(args, base_flags, base_origins)
        configure_logging(settings.log_level)
        code = COMMANDS[args.command](args, settings, out)
        out.flush()
        return code
    except BrokenPipeError:
        # The reader went away (``| head``): the rest of the output has nowhere to go. Point
        # stdout at /dev/null so that the interpreter's last flush cannot fail a second time.
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_FAILURE
    except UsageError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_SETTINGS
    except SettingsError as exc:
        sys.stderr.write(f"{prog}: error: {printable(str(exc))}\n")
        return EXIT_SETTINGS
    except SweepRefused as exc:  # pragma: no cover - handled in cmd_sweep
        sys.stderr.write(f"{prog}: refused: {printable(str(exc))}\n")
        return EXIT_REFUSED
    except (RestoreConflict, LeaseUnavailable, FswatchSyncError) as exc:
        # A restore conflict names the app: one line whatever its slug holds.
        sys.stderr.write(f"{prog}: {printable(str(exc))}\n")
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        sys.stderr.write(f"{prog}: database error: {first_line(exc)}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    finally:
        while _opened:
            _opened.pop().dispose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
