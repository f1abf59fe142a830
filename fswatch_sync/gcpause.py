"""Keeping the garbage collector's pauses out of the tool's write transactions.

CPython's cyclic collector stops the whole process for a pass over every tracked object; in a
host application with a large heap a full pass takes tens of milliseconds, and one that lands
inside a write transaction holds SQLite's write lock (or a server's row locks) that much
longer. :func:`held` pauses the collector from a write transaction's BEGIN to its COMMIT (the
wait for SQLite's write lock comes before it; a wait for a server's row lock is inside), the
span the time budget ``max_transaction_ms`` bounds: allocations go on, reference counting
frees what it always frees, and the collection they would have triggered runs right after the
commit, outside the lock. The sweep's survey of the tree (scan, read of every app row, plan)
is paused the same way: it makes an object or more per app, and a collector left running would
walk the growing heap again and again meanwhile. The pause is counted across threads: the
collector comes back when the last holder leaves, and only if it was running when the first
came (a host that disabled it keeps it disabled). A process forked while the pause is held (a
pre-fork server) starts without the threads that held it: the child gets the collector back.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0
_resume = False


@contextmanager
def held() -> Iterator[None]:
    """No collector pass starts while the block runs (in this thread or another)."""
    global _holders, _resume
    with _lock:
        if _holders == 0:
            _resume = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _resume:
                gc.enable()


def _after_fork_in_child() -> None:
    # The holders were threads of the parent; none of them will ever leave in the child.
    global _holders, _lock
    _lock = threading.Lock()
    if _holders and _resume:
        gc.enable()
    _holders = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
