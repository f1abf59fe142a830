"""What one sweep did (or, in a dry run, would do): the counts a sweep fills in as it goes.

The command line prints it (``to_dict()`` is ``sweep --json``), the service counts it and the
``sweep_finished`` signal carries it, so it stands apart from the sweep that fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fswatch_sync.layout import AppKey


@dataclass
class SweepReport:
    """What one sweep did (or, in a dry run, would do)."""

    dry_run: bool = False
    forced: bool = False
    orphan_apps: int = 0
    orphan_app_rows: int = 0
    marked_missing: int = 0
    failed_apps: int = 0
    failed_tasks: int = 0
    orphan_tasks: int = 0
    stuck_tasks: int = 0
    old_tasks: int = 0
    old_tasks_kept: int = 0
    journal_pruned: int = 0
    dependents_deleted: int = 0
    dependents_nullified: int = 0
    stuck_running: int = 0
    stuck_pending: int = 0
    blocked_apps: int = 0
    kept_present: int = 0
    app_rows: int = 0
    app_keys: int = 0
    app_dirs: int = 0
    unreadable_dirs: int = 0
    refused: str | None = None
    # Model directories that prove nothing about their apps (see treehealth); their rows stay.
    untrusted_models: list[str] = field(default_factory=list)
    untrusted_rows: int = 0
    started_at: datetime | None = None
    duration_seconds: float = 0.0
    removed: list[AppKey] = field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        return {
            "orphan_apps": self.orphan_apps,
            "orphan_tasks": self.orphan_tasks,
            "stuck_tasks": self.stuck_tasks,
            "old_tasks": self.old_tasks,
            "blocked_apps": self.blocked_apps,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.counts(),
            "dry_run": self.dry_run,
            "forced": self.forced,
            "refused": self.refused is not None,
            "reason": self.refused,
            "stuck_running": self.stuck_running,
            "stuck_pending": self.stuck_pending,
            "journal_pruned": self.journal_pruned,
            # orphan_apps counts app keys (directories); a key may own several rows.
            "orphan_app_rows": self.orphan_app_rows,
            "marked_missing": self.marked_missing,
            # Refused by the database (a host constraint or trigger), left for the next sweep.
            "failed_apps": self.failed_apps,
            "failed_tasks": self.failed_tasks,
            "old_tasks_kept": self.old_tasks_kept,
            "dependents_deleted": self.dependents_deleted,
            "dependents_nullified": self.dependents_nullified,
            "app_keys": self.app_keys,
            "kept_present": self.kept_present,
            "app_rows": self.app_rows,
            "app_dirs": self.app_dirs,
            "unreadable_dirs": self.unreadable_dirs,
            "untrusted_models": self.untrusted_models,
            "untrusted_rows": self.untrusted_rows,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "duration_seconds": round(self.duration_seconds, 3),
        }
