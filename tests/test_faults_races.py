"""Issue 5, item 3 — races: the quick rounds of ``race-runner-vs-tool`` (fixed hypothesis
examples; the long, seeded rounds run from ``scripts/reliability``), plus proof that the checker
catches a lost update and a wrong removal when they happen."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import faults.races  # noqa: F401  (registers the scenario)
import pytest
import sqlalchemy as sa
from faults import harness
from faults.races import run_property

from fswatch_sync import db
from fswatch_sync import store as store_module
from fswatch_sync.store import Store, TaskChange


def test_race_runner_vs_tool_quick_rounds(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("race-runner-vs-tool", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


# -- the checker must catch what it is there to catch ---------------------------------------------


def _blind_change_batch(
    self: Store,
    pks: Sequence[Any],
    still: Any,
    new_status: str,
    message: str,
    action: str,
    source: str,
    now: datetime,
) -> list[TaskChange]:
    """The seed system's way: read the tasks, then write the new status by id alone."""
    host = self.host
    id_col = host.task_col("id")
    with self.reader.connect() as connection:
        rows = connection.execute(sa.select(host.tasks).where(id_col.in_(pks), still)).all()
    journal = store_module._Journal(source, now)
    changes = []
    for row in rows:
        key = store_module._task_key(host, row)
        old = row._mapping["status"]
        changes.append(TaskChange(row._mapping["id"], row._mapping["task_id"], key, old,
                                  new_status))
        journal.add(action, host.tasks, row, key, old_status=old, new_status=new_status)
    if rows:
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(host.tasks)
                .where(id_col.in_([row._mapping["id"] for row in rows]))
                .values(status=new_status, completed_at=db.to_db_time(now))
            )
            journal.write(connection)
    return changes


def _failure_text(exc: BaseException) -> str:
    parts = [str(exc)]
    for inner in getattr(exc, "exceptions", ()):
        parts.append(_failure_text(inner))
    return " | ".join(parts)


def test_the_property_finds_a_lost_update_in_a_blind_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool that writes a status without comparing it to the one it read must be caught."""
    monkeypatch.setattr(Store, "_change_batch", _blind_change_batch)
    with pytest.raises(Exception) as caught:
        run_property(f"sqlite:///{tmp_path / 'mutant.db'}", tmp_path, examples=150, fixed=True,
                     rng_seed=0, shrink=False)
    assert "lost update" in _failure_text(caught.value), _failure_text(caught.value)


def test_the_property_finds_a_removal_that_ignores_its_recheck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that asks the disk but deletes anyway must be caught."""
    original = Store.remove_apps

    def ignoring(self: Store, keys: Any, **kwargs: Any) -> Any:
        check = kwargs.pop("still_absent", None)
        keys = list(keys)
        for key in keys:
            if check is not None:
                check(key)
        return original(self, keys, **kwargs)

    monkeypatch.setattr(Store, "remove_apps", ignoring)
    with pytest.raises(Exception) as caught:
        run_property(f"sqlite:///{tmp_path / 'mutant.db'}", tmp_path, examples=150, fixed=True,
                     rng_seed=0, shrink=False)
    text = _failure_text(caught.value)
    assert "re-check" in text or "was back before" in text, text


def test_race_reactor_recreate_quick_rounds(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("race-reactor-recreate", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"
