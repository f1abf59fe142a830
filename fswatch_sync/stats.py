"""Counters and gauges one instance keeps about itself, safe to touch from any thread."""

from __future__ import annotations

import threading
import time
from typing import Any

# Upper bounds (seconds) of the sweep-duration histogram's buckets; one more bucket is +Inf.
SWEEP_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Every counter an instance keeps, with what it counts: the one list that status and /metrics
# both read.
COUNTERS = {
    "apps_removed": "App keys removed because their directory is gone.",
    "tasks_cancelled": "Tasks set to cancelled.",
    "tasks_failed": "Running tasks failed for exceeding the RUNNING timeout.",
    "tasks_purged": "Old terminal tasks deleted.",
    "events_handled": "Filesystem hints received by the reactor.",
    "sweeps": "Sweeps run by this instance.",
    "sweeps_refused": "Sweeps refused by the guard.",
    "errors": "Errors: failed batches, observer failures, lost events.",
    "poison_failures": "Failed lone tries of app keys the database refuses (see reactor.py).",
}


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
        self._values.update(
            queue_depth=0, apps_marked_missing=0, poison_keys=0, poison=[], watch_state="starting",
            last_sweep_at=None, last_sweep=None,
            last_sweep_timestamp=0.0, sweep_duration_sum=0.0,
            sweep_duration_buckets=[0] * (len(SWEEP_DURATION_BUCKETS) + 1),
        )

    def observe_sweep(self, seconds: float) -> None:
        """Record one sweep's duration in the histogram and when it finished."""
        index = next(
            (i for i, bound in enumerate(SWEEP_DURATION_BUCKETS) if seconds <= bound),
            len(SWEEP_DURATION_BUCKETS),
        )
        with self._lock:
            buckets = list(self._values["sweep_duration_buckets"])
            buckets[index] += 1
            self._values["sweep_duration_buckets"] = buckets
            self._values["sweep_duration_sum"] += seconds
            self._values["last_sweep_timestamp"] = time.time()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def set(self, name: str, value: Any) -> None:
        with self._lock:
            self._values[name] = value

    def get(self, name: str) -> Any:
        with self._lock:
            return self._values.get(name)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)
