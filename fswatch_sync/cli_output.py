"""What the commands print: each result as JSON (``--json``) or as text for a person, and the
sweep's progress on a terminal.

The names shown to a person pass through :func:`fswatch_sync.text.printable`: a slug holding a
newline or a terminal escape must not split a line or forge one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from fswatch_sync import journal
from fswatch_sync.settings import Settings
from fswatch_sync.sweep_report import SweepReport
from fswatch_sync.text import printable


def _print_table(rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    if not rows:
        return
    # A name may hold a newline or a terminal escape: one table row is one line, whatever it holds.
    shown = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in shown) for i in range(len(rows[0]))]
    for row in shown:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


def stderr_progress(label: str, done: int, total: int) -> None:
    if total:
        sys.stderr.write(f"\r{label}: {done}/{total}  ")
        if done >= total:
            sys.stderr.write("\n")
    else:
        sys.stderr.write(f"{label}...\n")
    sys.stderr.flush()


def write_sweep(report: SweepReport, out: TextIO, *, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(report.to_dict()) + "\n")
        return
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


def write_status(
    out: TextIO,
    *,
    settings: Settings,
    found: Sequence[Mapping[str, Any]],
    sweeps: Sequence[Mapping[str, Any]],
    lease_holder: str | None,
    marked: int,
    waiting: int,
    as_json: bool,
) -> None:
    """``found``: the instances; ``waiting``: the app rows that wait for the tree."""
    if as_json:
        out.write(json.dumps({
            "database": settings.redacted_database_url(),
            "root": str(settings.root),
            "instances": found,
            "sweeps": sweeps,
            "sweep_lease_holder": lease_holder,
            "apps_marked_missing": marked,
            "waiting_rows": waiting,
        }, default=str) + "\n")
        return
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


def write_journal(entries: Sequence[Mapping[str, Any]], out: TextIO, *, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(entries, default=str) + "\n")
        return
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


def write_restore(
    result: journal.RestoreResult,
    out: TextIO,
    *,
    dry_run: bool,
    missing: Sequence[str],
    as_json: bool,
) -> None:
    """``missing``: the restored apps that still have no directory (named in JSON only: the
    command logs a warning about them)."""
    if as_json:
        out.write(json.dumps({"restored": result.restored, "by_action": result.by_action,
                              "dry_run": dry_run, "still_missing": missing}) + "\n")
        return
    verb = "would restore" if dry_run else "restored"
    details = ", ".join(f"{n} {a}" for a, n in sorted(result.by_action.items()))
    out.write(f"{verb} {result.restored} entries ({details})\n")
