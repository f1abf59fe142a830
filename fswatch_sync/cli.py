"""The ``fswatch-sync`` command line: argument parsing and human/JSON output only.

Exit status: 0 success, 1 failure, 2 bad settings or usage, 3 the sweep's guard refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn, TextIO

from sqlalchemy.exc import SQLAlchemyError

from fswatch_sync import db, journal, records
from fswatch_sync.errors import (
    FswatchSyncError,
    LeaseUnavailable,
    RestoreConflict,
    SettingsError,
    SweepRefused,
)
from fswatch_sync.layout import is_safe_slug, parse_app_dir_name
from fswatch_sync.settings import SECRET_SETTINGS, SPECS, Settings, load_settings, redact_url
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper, SweepReport
from fswatch_sync.text import first_line, printable

PROG = "fswatch-sync"
EXIT_OK, EXIT_FAILURE, EXIT_SETTINGS, EXIT_REFUSED = 0, 1, 2, 3
log = logging.getLogger("fswatch_sync")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other bad input
        self.exit(EXIT_SETTINGS, f"{self.prog}: error: {message}\n")


def _settings_parent() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("settings (flag > environment > config file > default)")
    group.add_argument("--config", metavar="PATH", help="TOML settings file (FSWATCH_SYNC_CONFIG)")
    for spec in SPECS:
        if spec.name in SECRET_SETTINGS:
            continue  # secrets come from the environment or the file, never argv
        group.add_argument(
            spec.flag, dest=f"setting_{spec.name}", metavar="VALUE", default=None,
            help=f"{spec.help} ({spec.env})",
        )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parent = _settings_parent()
    parser = _Parser(
        prog=PROG, description="Keep app rows and tasks in step with a directory tree."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", parents=[parent], help="run the daemon: watch and sweep")

    sweep = commands.add_parser("sweep", parents=[parent], help="one full reconciliation pass")
    sweep.add_argument(
        "--dry-run", action="store_true", help="change nothing; report what a run would do"
    )
    sweep.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sweep.add_argument("--force", action="store_true", help="pass the mass-deletion guard")
    sweep.add_argument("--now", metavar="ISO", help=argparse.SUPPRESS)

    status = commands.add_parser("status", parents=[parent], help="instances and recent sweeps")
    status.add_argument("--json", action="store_true")

    commands.add_parser("init-db", parents=[parent], help="create the tables (idempotent)")

    listing = commands.add_parser("journal", parents=[parent], help="list recorded changes")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--limit", type=int, default=50)
    _add_selection(listing)
    listing.add_argument("--all", action="store_true", help="include entries already restored")

    restore = commands.add_parser("restore", parents=[parent], help="undo recorded changes")
    _add_selection(restore)
    restore.add_argument("--dry-run", action="store_true")
    restore.add_argument("--json", action="store_true")
    return parser


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", action="append", default=[], metavar="N[,N|N-M]",
                        help="journal entry ids")
    parser.add_argument("--batch", metavar="UUID", help="every entry of one transaction")
    parser.add_argument("--since", metavar="ISO", help="entries at or after this UTC time")
    parser.add_argument("--until", metavar="ISO", help="entries at or before this UTC time")
    parser.add_argument("--app", metavar="SLUG/appN", help="entries of one app")
    parser.add_argument("--action", help="app_removed, task_cancelled, task_failed, task_purged...")


def _time(setting: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return db.from_db_time(datetime.fromisoformat(text))
    except ValueError:
        raise SettingsError(setting, f"{text!r} is not an ISO date/time") from None


def _selection(args: argparse.Namespace) -> journal.Selection:
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
    args: argparse.Namespace, base_flags: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from argv flags, then ``base_flags`` (a host app's config), env, file, default."""
    flags = dict(base_flags or {})
    config_path = flags.pop("config", None)
    flags.update(
        (key.removeprefix("setting_"), value)
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    )
    return load_settings(
        flags,
        config_path=args.config or config_path,
        require_root=args.command in _COMMANDS_USING_ROOT,
    )


_opened: list[Any] = []  # engines a command opened; main() closes their pools when it ends


def open_store(settings: Settings) -> Store:
    store = Store.from_settings(settings)
    _opened.append(store.engine)
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
        report = sweeper.run(now=now, dry_run=args.dry_run, force=args.force, trigger="manual")
        code = EXIT_OK
    except SweepRefused as exc:
        report = SweepReport(dry_run=args.dry_run, forced=args.force, refused=str(exc))
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
        rows.append(("took", f"{report.duration_seconds:.2f}s"))
        _print_table(rows, out)
        if report.dry_run:
            out.write("dry run: nothing was changed\n")
    return code


def cmd_init_db(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    created = open_store(settings).init_db()
    target = redact_url(settings.database_url)
    if created:
        out.write(f"created {', '.join(created)} in {target}\n")
    else:
        out.write(f"all tables already exist in {target}\n")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = open_store(settings)
    store.ensure_tool_tables()
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
        }, default=str) + "\n")
        return EXIT_OK
    out.write(f"database  {printable(settings.redacted_database_url())}\n"
              f"root      {printable(str(settings.root))}\n")
    out.write(f"marked    {marked} app(s) missing, waiting out the missing-since grace\n\n"
              if marked else "\n")
    live = [i for i in found if i["live"]]
    out.write(f"instances ({len(live)} live)\n")
    _print_table(
        [("id", "state", "heartbeat", "live")]
        + [(i["instance_id"], i["state"], i["heartbeat_at"], "yes" if i["live"] else "no")
           for i in found[:10]],
        out,
    )
    out.write("\nrecent sweeps\n")
    _print_table(
        [("id", "started", "trigger", "outcome", "apps", "orphan tasks", "stuck", "old")]
        + [(s["id"], s["started_at"], s["trigger"], s["outcome"], s["orphan_apps"],
            s["orphan_tasks"], s["stuck_tasks"], s["old_tasks"]) for s in sweeps],
        out,
    )
    return EXIT_OK


def cmd_journal(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = open_store(settings)
    store.ensure_tool_tables()
    entries = journal.list_entries(store.engine, _selection(args), limit=args.limit)
    if args.json:
        out.write(json.dumps(entries, default=str) + "\n")
        return EXIT_OK
    rows: list[tuple[Any, ...]] = [("id", "at", "action", "source", "app", "status", "restored")]
    for e in entries:
        app = f"{e['model_slug']}/app{e['app_number']}" if e["model_slug"] is not None else ""
        status = f"{e['old_status']} -> {e['new_status']}" if e["new_status"] else ""
        rows.append((e["id"], e["at"], e["action"], e["source"], app, status,
                     e["restored_at"] or ""))
    _print_table(rows, out)
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = open_store(settings)
    store.ensure_tool_tables()
    result = journal.restore(store, _selection(args), dry_run=args.dry_run)
    if args.json:
        out.write(json.dumps({"restored": result.restored, "by_action": result.by_action,
                              "dry_run": args.dry_run}) + "\n")
    else:
        verb = "would restore" if args.dry_run else "restored"
        details = ", ".join(f"{n} {a}" for a, n in sorted(result.by_action.items()))
        out.write(f"{verb} {result.restored} entries ({details})\n")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from fswatch_sync.daemon import run_daemon

    return int(run_daemon(settings))


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, TextIO], int]] = {
    "sweep": cmd_sweep,
    "init-db": cmd_init_db,
    "status": cmd_status,
    "journal": cmd_journal,
    "restore": cmd_restore,
    "run": cmd_run,
}


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    base_flags: Mapping[str, Any] | None = None,
) -> int:
    """Run one command; ``base_flags`` are settings a host app configured (argv flags win)."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        settings = _settings_from(args, base_flags)
        configure_logging(settings.log_level)
        return COMMANDS[args.command](args, settings, out)
    except SettingsError as exc:
        sys.stderr.write(f"{PROG}: error: {printable(str(exc))}\n")
        return EXIT_SETTINGS
    except SweepRefused as exc:  # pragma: no cover - handled in cmd_sweep
        sys.stderr.write(f"{PROG}: refused: {printable(str(exc))}\n")
        return EXIT_REFUSED
    except (RestoreConflict, LeaseUnavailable, FswatchSyncError) as exc:
        # A restore conflict names the app: one line whatever its slug holds.
        sys.stderr.write(f"{PROG}: {printable(str(exc))}\n")
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        sys.stderr.write(f"{PROG}: database error: {first_line(exc)}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    finally:
        while _opened:
            _opened.pop().dispose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
