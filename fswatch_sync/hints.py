"""What the watcher tells the reactor: an app directory, or a whole model directory, may be gone.

These are hints, not verdicts: the reactor re-checks the disk and the database decides. They live
apart from both so that the reactor need not import the watcher to read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fswatch_sync.layout import AppKey


@dataclass(frozen=True)
class AppGone:
    """The app directory may have been removed, moved away or renamed.

    ``reported``: the kernel itself reported the directory unlinked from (or moved out of) its
    model directory, watched on the root's device — a fact no unmount can fake, so it holds even
    when the root is gone by the time the reactor gets to it. A polling observer's hints are
    inferred from listings (an empty mount looks like deletions) and are never ``reported``.
    """

    key: AppKey
    # Evidence about the hint, not part of what it names: equal hints name the same app.
    reported: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class ModelGone:
    """The whole model directory may have been removed: every app of that slug is a candidate.

    ``reported``: as for :class:`AppGone` — the kernel reported the model directory removed
    (``rmdir`` succeeds only on an empty directory, and never on a mount point) or moved out.
    """

    slug: str
    reported: bool = field(default=False, compare=False)


Hint = AppGone | ModelGone
