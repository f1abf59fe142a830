"""How many rows one transaction takes: a size that follows the time budget
(``max_transaction_ms``), within the bounds every backend accepts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# Bounds of the adaptive batch: a bound parameter per row, and SQLite allows 32766 per statement.
MIN_BATCH = 20
MAX_BATCH = 20_000
# The share of the budget a batch is sized to take, the rest a margin for a batch slower than
# the ones before it (a checkpoint, the disk busy with another writer's pages, a cold cache).
AIM = 0.6


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BatchSizer:
    """A batch size that follows the time budget: rows per transaction grow while batches end
    well inside ``budget`` seconds and shrink when one overruns it."""

    def __init__(self, initial: int, budget: float) -> None:
        self.size = max(1, min(initial, MAX_BATCH))
        self.minimum = min(self.size, MIN_BATCH)
        self.budget = budget

    def record(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        # At most double or quarter per step, so one odd batch cannot swing the size far.
        target = int(rows * self.budget * AIM / seconds)
        self.size = max(self.minimum, min(MAX_BATCH, self.size * 2, max(self.size // 4, target)))
