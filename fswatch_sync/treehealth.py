"""Can the tree be trusted? Whether the absence of a directory under the root proves anything.

An app directory that is not there proves its app gone only when the directory it should be in
is the real one. An unmounted volume leaves an empty mount point (or nothing) where the root was;
a volume mounted over one model directory hides that model's apps; in both cases every app looks
absent while every app still exists. This module is the one place that decides, for the root and
for each model directory, whether absence there proves anything. The sweep, the reactor and the
service ask it; none of them decides on its own.

The rules (pure, see :func:`judge_root` and :func:`judge_model`):

* The root must be a directory (with its marker file when one is configured) that could be
  listed; otherwise it is *missing* and nothing is removed, whatever the flags.
* A root that holds no app directory while app rows exist is *empty* — what an unmounted volume's
  mount point looks like — unless it is the very directory (device, inode) seen holding apps
  before: then its last apps were really deleted. ``allow_empty_root`` passes it too.
* A model directory on another device than the root (a mount over it, or under it), or one that
  shows no app while rows exist for its slug and is not the directory seen holding apps before,
  is *untrusted*: nothing of that slug is removed unless the operator forces that model. A model
  directory that is not there at all (under a trusted root) is a real removal of the model.
* A model directory that could not be listed proves nothing, forced or not.

"What was seen before" comes from the running service (the root as its monitor last saw it holding
apps, each model directory as its watch was made) or from identities the sweep records in
``fswatch_sync_tree`` (one row per directory, per host and root, so hosts that see one network
share under different device numbers never compare each other's).

A removal the kernel itself reported (``hints.AppGone.reported``: a directory unlinked from, or
moved out of, its watched model directory on the root's device) needs none of this: no unmount
can produce one, so the reactor applies it even when the root is gone by the time it gets to it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.batching import chunks
from fswatch_sync.layout import AppKey, is_safe_slug
from fswatch_sync.schema import tree_table

# (st_dev, st_ino): which directory a path leads to.
Identity = tuple[int, int]

ROOT_MISSING = "root-missing"
ROOT_EMPTY = "root-empty"
# Why a model directory is not trusted.
MODEL_MOUNTED = "mounted"
MODEL_EMPTY = "empty"
MODEL_UNREADABLE = "unreadable"


class Seen(Enum):
    DIRECTORY = "directory"
    ABSENT = "absent"  # provably not a directory there (nothing, a file, a symbolic link)
    UNKNOWN = "unknown"  # could not be examined (permission, I/O error): proves nothing


class Look(NamedTuple):
    """What one ``stat`` of a path showed."""

    seen: Seen
    identity: Identity | None = None

    @property
    def device(self) -> int | None:
        return None if self.identity is None else self.identity[0]


Stat = Callable[[Path], os.stat_result]


def look(path: Path, *, follow: bool, stat_fn: Stat | None = None) -> Look:
    """Stat ``path`` (following a symbolic link only when ``follow``) and say what it is."""
    function: Stat = stat_fn or (os.stat if follow else os.lstat)
    try:
        info = function(path)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return Look(Seen.ABSENT)
    except OSError as exc:
        # No directory can carry a name longer than the filesystem allows (see layout).
        return Look(Seen.ABSENT if exc.errno == errno.ENAMETOOLONG else Seen.UNKNOWN)
    if not stat.S_ISDIR(info.st_mode):
        return Look(Seen.ABSENT)
    return Look(Seen.DIRECTORY, (info.st_dev, info.st_ino))


def look_at_root(root: Path, marker: str = "", stat_fn: Stat | None = None) -> Look:
    """The root as the rules see it: a directory holding its marker, or absent.

    The root may be a symbolic link to a mounted volume: it is followed. A missing marker makes
    the root absent (an empty mount point has no marker), and so does one that cannot be
    examined: a root that cannot be checked is not trusted.
    """
    seen = look(root, follow=True, stat_fn=stat_fn)
    if seen.seen is not Seen.DIRECTORY:
        return Look(Seen.ABSENT)
    if marker:
        try:
            is_file = stat.S_ISREG((stat_fn or os.stat)(root / marker).st_mode)
        except (OSError, ValueError):
            is_file = False
        if not is_file:
            return Look(Seen.ABSENT)
    return seen


# -- the rules, pure -------------------------------------------------------------------------


def judge_root(
    root: Look,
    *,
    apps_seen: bool,
    rows_exist: bool,
    known: Identity | None,
    allow_empty: bool = False,
) -> str | None:
    """Why absence under this root proves nothing (``ROOT_MISSING``/``ROOT_EMPTY``), or None.

    ``known``: the identity the root had when it was last seen holding apps (or when its watch
    was made); an empty root that is still that directory had its last apps really deleted.
    """
    if root.seen is not Seen.DIRECTORY:
        return ROOT_MISSING
    if apps_seen or not rows_exist or allow_empty:
        return None
    if known is not None and root.identity == known:
        return None
    return ROOT_EMPTY


def judge_model(
    model: Look,
    *,
    root_device: int | None,
    apps_seen: bool,
    rows_exist: bool,
    known: Identity | None,
    forced: bool = False,
    allow_empty: bool = False,
) -> str | None:
    """Why absence in this model directory proves nothing (``MODEL_*``), or None.

    Only for a model under a trusted root: a model directory that is not there is a removal.
    ``allow_empty``: the operator said an empty tree is really empty (a mount still is not).
    """
    if model.seen is Seen.ABSENT:
        return None
    if model.seen is Seen.UNKNOWN:
        return MODEL_UNREADABLE  # forcing cannot tell which of its apps are there
    if forced:
        return None
    if root_device is not None and model.device != root_device:
        return MODEL_MOUNTED
    if apps_seen or not rows_exist or allow_empty:
        return None
    if known is not None and model.identity == known:
        return None
    return MODEL_EMPTY


# -- the whole tree, for the sweep -------------------------------------------------------------


@dataclass(frozen=True)
class TreeHealth:
    """The verdict on a tree: whether the root is usable, and which models are not."""

    root_problem: str | None
    root: Look
    untrusted: Mapping[str, str] = field(default_factory=dict)  # slug -> reason
    # Identities worth recording as "seen holding apps" (None: the root).
    seen_holding_apps: Mapping[str | None, Identity] = field(default_factory=dict)
    absent_models: frozenset[str] = frozenset()

    def trusts(self, key: AppKey) -> bool:
        return self.root_problem is None and key.model_slug not in self.untrusted


def assess(
    root: Path,
    *,
    marker: str,
    root_listed: bool,
    present: Iterable[tuple[str, int]],
    unreadable: Iterable[str],
    row_slugs: Mapping[str, int],
    known: Mapping[str | None, Identity],
    allow_empty_root: bool = False,
    force_models: Iterable[str] = (),
    stat_fn: Stat | None = None,
) -> TreeHealth:
    """Judge the root and every model directory that matters, from one scan of the tree.

    ``row_slugs``: how many app rows each slug has. Only model directories that have rows or
    apps are looked at (one ``lstat`` each).
    """
    root_look = look_at_root(root, marker, stat_fn) if root_listed else Look(Seen.ABSENT)
    apps_by_slug: dict[str, int] = {}
    for slug, _number in present:
        apps_by_slug[slug] = apps_by_slug.get(slug, 0) + 1
    problem = judge_root(
        root_look,
        apps_seen=bool(apps_by_slug),
        rows_exist=any(row_slugs.values()),
        known=known.get(None),
        allow_empty=allow_empty_root,
    )
    if problem is not None:
        return TreeHealth(problem, root_look)
    forced = frozenset(force_models)
    unreadable_slugs = frozenset(unreadable)
    untrusted: dict[str, str] = {}
    seen: dict[str | None, Identity] = {}
    absent: set[str] = set()
    if root_look.identity is not None and (apps_by_slug or root_look.identity == known.get(None)):
        seen[None] = root_look.identity
    for slug in sorted(set(row_slugs) | set(apps_by_slug) | unreadable_slugs):
        if slug in unreadable_slugs:
            untrusted[slug] = MODEL_UNREADABLE
            continue
        if not is_safe_slug(slug):
            continue  # names no directory: its rows are absent, whatever the tree
        model = look(root / slug, follow=False, stat_fn=stat_fn)
        if model.seen is Seen.ABSENT:
            absent.add(slug)
        reason = judge_model(
            model,
            root_device=root_look.device,
            apps_seen=apps_by_slug.get(slug, 0) > 0,
            rows_exist=row_slugs.get(slug, 0) > 0,
            known=known.get(slug),
            forced=slug in forced,
            # --allow-empty-root on a root with no app at all: its model directories are empty
            # for the same reason the operator vouched for.
            allow_empty=allow_empty_root and not apps_by_slug,
        )
        if reason is not None:
            untrusted[slug] = reason
        elif model.identity is not None and model.device == root_look.device and (
            apps_by_slug.get(slug, 0) > 0 or model.identity == known.get(slug)
        ):
            seen[slug] = model.identity
    return TreeHealth(None, root_look, untrusted, seen, frozenset(absent))


def count_rows(engine: Engine, apps: sa.Table) -> int:
    """How many app rows there are (while the tree proves nothing, every one is waiting)."""
    with db.read_only(engine).connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(apps)).scalar_one())


# -- identities recorded in the database, for sweeps in later processes -----------------------


def tree_scope(root: Path, hostname: str | None = None) -> str:
    """Which host's view of which root a recorded identity belongs to (64 hex characters)."""
    host = socket.gethostname() if hostname is None else hostname
    text = f"{host}\0{os.path.abspath(root)}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _identity_text(identity: Identity) -> str:
    return f"{identity[0]}:{identity[1]}"


def _parse_identity(text: str) -> Identity | None:
    device, _, inode = text.partition(":")
    try:
        return int(device), int(inode)
    except ValueError:
        return None


# Model directories forgotten per statement: far below any backend's limit on parameters.
_NAMES_PER_STATEMENT = 1000


class TreeRecord:
    """The identities of the root and model directories last seen holding apps, per scope."""

    def __init__(self, engine: Engine, root: Path, hostname: str | None = None) -> None:
        self.engine = engine
        self.scope = tree_scope(root, hostname)

    def load(self) -> dict[str | None, Identity]:
        table = tree_table
        with db.read_only(self.engine).connect() as connection:
            rows = connection.execute(
                sa.select(table.c.slug, table.c.identity).where(table.c.scope == self.scope)
            ).all()
        found: dict[str | None, Identity] = {}
        for slug, text in rows:
            identity = _parse_identity(text)
            if identity is not None:
                found[slug] = identity
        return found

    def save(
        self,
        seen: Mapping[str | None, Identity],
        *,
        forget: Iterable[str] = (),
        known: Mapping[str | None, Identity],
        now: datetime,
    ) -> None:
        """Record what changed since ``known`` (what :meth:`load` returned); forget the model
        directories that are gone (their identity may be reused by a new directory)."""
        changed = {name: ident for name, ident in seen.items() if known.get(name) != ident}
        gone = [slug for slug in forget if slug in known]
        if not changed and not gone:
            return
        table = tree_table
        names = [*changed, *gone]
        slugs = [name for name in names if name is not None]
        with self.engine.begin() as connection:
            # A statement per thousand names, not one per name (every model changes the first
            # time); the root's row has no slug.
            if None in names:
                connection.execute(
                    sa.delete(table).where(table.c.scope == self.scope, table.c.slug.is_(None))
                )
            for part in chunks(slugs, _NAMES_PER_STATEMENT):
                connection.execute(
                    sa.delete(table).where(table.c.scope == self.scope, table.c.slug.in_(part))
                )
            if changed:
                connection.execute(
                    sa.insert(table),
                    [
                        {
                            "scope": self.scope,
                            "slug": name,
                            "identity": _identity_text(ident),
                            "recorded_at": db.to_db_time(now),
                        }
                        for name, ident in changed.items()
                    ],
                )
