"""Counters and gauges one instance keeps about itself, safe to touch from any thread."""

from __future__ import annotations

import threading
from typing import Any

COUNTERS = (
    "apps_removed",
    "tasks_cancelled",
    "tasks_failed",
    "tasks_purged",
    "events_handled",
    "sweeps",
    "sweeps_refused",
    "errors",
)


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
        self._values.update(
            queue_depth=0, watch_state="starting", last_sweep_at=None, last_sweep=None
        )

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
