"""What each command of the command line does, from parsed arguments and settings to an exit
status; :mod:`fswatch_sync.cli_output` prints the results.

A command raises what it cannot handle (bad settings, a database error, a refused restore):
:func:`fswatch_sync.cli.main` turns it into one line on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TextIO

import sqlalchemy as sa

from fswatch_sync import db, journal, migrations, records
from fswatch_sync.cli_args import (
    EXIT_OK,
    EXIT_REFUSED,
    PROG,
    UsageError,
    parse_time,
    selection_from,
)
from fswatch_sync.cli_output import (
    stderr_progress,
    write_journal,
    write_restore,
    write_status,
    write_sweep,
)
from fswatch_sync.cli_store import open_existing_store, open_store, track
from fswatch_sync.dburl import redact_url
from fswatch_sync.errors import SweepRefused
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper
from fswatch_sync.sweep_report import SweepReport
from fswatch_sync.text import printable

log = logging.getLogger("fswatch_sync")


def cmd_sweep(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = open_store(settings)
    if not args.dry_run:
        store.ensure_tool_tables()
    progress = stderr_progress if sys.stderr.isatty() and not args.json else None
    sweeper = Sweeper(
        store, settings, instance_id=f"cli-{records.new_instance_id()}", progress=progress
    )
    now = parse_time("--now", args.now)
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
    # A person was told of a refusal on stderr; --json still prints what the guard saw.
    if args.json or code == EXIT_OK:
        write_sweep(report, out, as_json=args.json)
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
    engine = track(db.create_engine(settings.database_url))
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
    write_status(
        out, settings=settings, found=found, sweeps=sweeps, lease_holder=lease_holder,
        marked=marked, waiting=_waiting_rows(found), as_json=args.json,
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
    selection = selection_from(args)
    store = open_existing_store(settings)
    limit = args.limit or _NO_LIMIT
    entries = journal.list_entries(store.engine, selection, limit=min(limit + 1, _NO_LIMIT))
    truncated = len(entries) > limit
    entries = entries[:limit]
    write_journal(entries, out, as_json=args.json)
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
    selection = selection_from(args)
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
    write_restore(result, out, dry_run=args.dry_run, missing=missing, as_json=args.json)
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
