"""Turn what the store committed into signals (always after the commit)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fswatch_sync import signals
from fswatch_sync.outcomes import RemovalOutcome, TaskChange


def removal(sender: Any, outcome: RemovalOutcome, source: str) -> None:
    cancelled_by_key: dict[Any, list[TaskChange]] = {}
    for change in outcome.cancelled:
        cancelled_by_key.setdefault(change.key, []).append(change)
    for key in outcome.removed:
        signals.send(
            signals.app_removed,
            sender,
            key=key,
            source=source,
            cancelled=cancelled_by_key.get(key, []),
        )
    task_changes(sender, outcome.cancelled, reason="app_removed", source=source)


def task_changes(
    sender: Any,
    changes: Iterable[TaskChange],
    *,
    reason: str,
    source: str,
    failed: bool = False,
) -> None:
    signal = signals.task_failed if failed else signals.task_cancelled
    for change in changes:
        signals.send(signal, sender, change=change, reason=reason, source=source)
