"""The sweep's pure planning: which app keys have no directory, and whether removing them is
allowed (the guard against a mass deletion).

Both judge plain values (the scan's keys, the rows' keys, counts): neither reads the disk or the
database, so each can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from fswatch_sync import treehealth
from fswatch_sync.layout import AppKey
from fswatch_sync.outcomes import AppRow


def orphan_keys(
    present: AbstractSet[tuple[str, int]],
    rows: Iterable[AppRow],
    unknown_slugs: Iterable[str] = (),
) -> list[AppKey]:
    """App keys without a directory, except keys in the new-app grace (judged by the database:
    an ``AppRow``'s last field) and keys in a model directory that could not be listed (absence not
    proven)."""
    unknown = frozenset(unknown_slugs)
    # An AppKey is a tuple: (slug, number) finds it in ``present`` without building one per row.
    return sorted(
        AppKey(slug, int(number))
        for slug, number, _rows, young in rows
        if not young and (slug, number) not in present and slug not in unknown
    )


def guard(
    *,
    root_problem: str | None,
    rows: int,
    orphans: int,
    max_fraction: float,
    force: bool,
) -> str | None:
    """Why the sweep must not run now, or None.

    ``root_problem`` is :mod:`fswatch_sync.treehealth`'s verdict on the root (an empty root was
    already let through there when it is the directory seen holding apps before, or when the
    operator allowed it); ``--force`` never passes it. ``force`` passes only the fraction. A
    single removal is never a mass deletion, unless the fraction is 0 (nothing without --force).
    """
    if root_problem == treehealth.ROOT_MISSING:
        return "the root is missing (not mounted?); nothing was changed"
    if root_problem is not None:
        return (
            f"the root holds no app directory while {rows} app rows exist and it is not the"
            " directory seen holding apps before (an unmounted volume's mount point looks like"
            " this); nothing was changed (use --allow-empty-root if the apps are really gone)"
        )
    if force:
        return None
    allowed = max(max_fraction * rows, 1.0 if max_fraction > 0 else 0.0)
    if rows and orphans > allowed:
        return (
            f"{orphans} of {rows} app rows ({orphans / rows:.0%}) have no directory, more than the"
            f" allowed {max_fraction:.0%}; nothing was changed (use --force to proceed)"
        )
    return None
