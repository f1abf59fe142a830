"""What the tree proves before a sweep removes anything, and whether the sweep may go ahead.

:class:`TreeJudge` scans the root, asks :mod:`fswatch_sync.treehealth` which parts of it prove
their apps absent, and applies the guard of :mod:`fswatch_sync.sweep_plan`. Only the sweep uses
it; it stands apart so that :class:`fswatch_sync.sweep.Sweeper` holds the running of the rules.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import NamedTuple

import sqlalchemy as sa

from fswatch_sync import gcpause, treehealth
from fswatch_sync.errors import SweepRefused
from fswatch_sync.layout import AppKey, PresentKeys, Scan, scan_tree
from fswatch_sync.settings import Settings
from fswatch_sync.store import Store
from fswatch_sync.sweep_plan import guard, orphan_keys
from fswatch_sync.sweep_report import SweepReport
from fswatch_sync.text import printable
from fswatch_sync.treehealth import Seen, TreeRecord

# The judgement is part of the sweep to whoever reads or filters the log: its warnings are the
# sweep's.
log = logging.getLogger("fswatch_sync.sweep")


class _Survey(NamedTuple):
    """What the survey of the tree found, for the guard and the record after it."""

    present: PresentKeys
    rows: int  # app keys with rows
    recorded: dict[str | None, treehealth.Identity]
    health: treehealth.TreeHealth
    untrusted: dict[str, str]
    candidates: list[AppKey]


class TreeJudge:
    """Judges the tree for every sweep of one sweeper (one root, one set of settings)."""

    def __init__(
        self,
        settings: Settings,
        tree_record: TreeRecord,
        known_root: Callable[[], treehealth.Identity | None] | None = None,
    ) -> None:
        self.settings = settings
        self.tree_record = tree_record
        # The root's identity as this process last saw it holding apps (a running service).
        self.known_root = known_root
        # Kept from sweep to sweep: the untrusted models are logged again only when they change.
        self._untrusted_logged: dict[str, str] = {}

    def judge(
        self,
        report: SweepReport,
        store: Store,
        now: datetime,
        grace: timedelta,
        *,
        live: bool,
        force: bool,
        allow_empty_root: bool,
        force_models: Iterable[str],
    ) -> tuple[list[AppKey], PresentKeys]:
        """Scan the tree, ask treehealth which parts of it prove absence, and apply the guard:
        the orphan keys and the apps present, or SweepRefused."""
        settings, root = self.settings, self.settings.root
        # The survey makes a tracked object or more per app: with the collector paused, the
        # pending passes run once after it instead of walking the growing heap again and again
        # (a full pass a sweep on 50k apps otherwise). No write transaction is open in it; the
        # pause is as long as the survey.
        with gcpause.held():
            survey = self._survey(
                report, store, young_after=now - grace, live=live,
                allow_empty_root=allow_empty_root, force_models=force_models,
            )
        present, health, untrusted, candidates = (
            survey.present, survey.health, survey.untrusted, survey.candidates
        )
        refusal = guard(
            root_problem=health.root_problem,
            rows=survey.rows,
            orphans=len(candidates),
            max_fraction=settings.max_delete_fraction,
            # An operator who says the root is really empty has said every row goes.
            force=force or (allow_empty_root and not present),
        )
        if refusal is not None:
            if health.root_problem is not None:
                # A path with a newline (or bytes that are not UTF-8) is quoted: one line.
                shown = str(root) if str(root).isprintable() else repr(str(root))
                refusal = f"{shown}: {refusal}"
            log.warning("sweep refused: %s", refusal)
            raise SweepRefused(refusal)
        if untrusted != self._untrusted_logged:
            self._untrusted_logged = untrusted
            if untrusted:
                log.warning(
                    "%d model directories do not prove their apps absent (a volume mounted over"
                    " or under them, or no app while rows exist); their %d rows are left alone"
                    " (--force-model SLUG to sweep one): %s",
                    len(untrusted),
                    report.untrusted_rows,
                    ", ".join(
                        f"{printable(slug)} ({why})" for slug, why in sorted(untrusted.items())
                    ),
                )
        if live:
            self.tree_record.save(
                health.seen_holding_apps, forget=health.absent_models, known=survey.recorded,
                now=now,
            )
        return candidates, present

    def _survey(
        self,
        report: SweepReport,
        store: Store,
        *,
        young_after: datetime,
        live: bool,
        allow_empty_root: bool,
        force_models: Iterable[str],
    ) -> _Survey:
        """The scan, the read of every app row, treehealth's verdict and the orphan keys (the
        report's counts filled in on the way); nothing written."""
        settings, root = self.settings, self.settings.root
        root_ok = treehealth.look_at_root(root, settings.root_marker).seen is Seen.DIRECTORY
        scan = scan_tree(root) if root_ok else Scan(set(), frozenset(), root_listed=False)
        present = scan.present
        if scan.unreadable:
            log.warning(
                "%d model directories could not be listed; their apps are left alone: %s",
                len(scan.unreadable),
                ", ".join(printable(slug) for slug in sorted(scan.unreadable)[:5]),
            )
        rows = store.app_rows(young_after=young_after)
        report.app_keys, report.app_dirs = len(rows), len(present)
        report.app_rows = sum(row[2] for row in rows)
        report.unreadable_dirs = len(scan.unreadable)
        row_slugs = Counter(row[0] for row in rows)
        recorded = self._recorded_tree(live)
        known = dict(recorded)
        if self.known_root is not None and (seen := self.known_root()) is not None:
            known[None] = seen  # this process saw it holding apps more recently than any sweep
        health = treehealth.assess(
            root,
            marker=settings.root_marker,
            root_listed=root_ok and scan.root_listed,
            present=present,
            unreadable=scan.unreadable,
            row_slugs=row_slugs,
            known=known,
            allow_empty_root=allow_empty_root,
            force_models=force_models,
        )
        untrusted = {
            slug: reason
            for slug, reason in health.untrusted.items()
            if reason != treehealth.MODEL_UNREADABLE
        }
        report.untrusted_models = sorted(untrusted)
        report.untrusted_rows = sum(row[2] for row in rows if row[0] in untrusted)
        candidates = (
            orphan_keys(present, rows, health.untrusted) if settings.cleanup_orphan_apps else []
        )
        return _Survey(present, len(rows), recorded, health, untrusted, candidates)

    def _recorded_tree(self, live: bool) -> dict[str | None, treehealth.Identity]:
        try:
            return self.tree_record.load()
        except sa.exc.DBAPIError:
            if live:
                raise
            return {}  # a dry run on a database whose tool tables were never created
