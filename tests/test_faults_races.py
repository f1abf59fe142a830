"""Issue 5, item 3 — races: the quick rounds of ``race-runner-vs-tool`` (fixed hypothesis
examples; the long, seeded rounds run from ``scripts/reliability``), plus proof that the checker
catches a lost update and a wrong removal when they happen."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import faults.races  # noqa: F401  (registers the scenario)
import pytest
import sqlalchemy as sa
from faults import harness
from faults.races import run_property

from fswatch_sync import changes, db
from fswatch_sync.layout import AppKey
from fswatch_sync.rules import SetStatus, TaskRule
from fswatch_sync.schema import journal_table
from fswatch_sync.store import Store, TaskChange


def test_race_runner_vs_tool_quick_rounds(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("race-runner-vs-tool", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


# -- the checker must catch what it is there to catch ---------------------------------------------


def _blind_task_batch(
    self: Store,
    rule: TaskRule,
    keys: list[Any],
    source: str,
    now: datetime,
    collect: bool,
) -> tuple[int, list[TaskChange]]:
    """The seed system's way: read the tasks, then write the new status by id alone, in another
    transaction and with no compare-and-set."""
    host = self.host
    pk = host.task_col("id")
    columns = [host.task_col(r) for r in ("id", "task_id", "target_model", "target_app_number",
                                          "status")]
    with self.reader.connect() as connection:
        rows = connection.execute(
            sa.select(*columns).where(pk.in_(keys), rule.where).order_by(pk)
        ).all()
    if not rows:
        return 0, []
    assert isinstance(rule.effect, SetStatus)
    new_status = rule.effect.status
    changes = [TaskChange(p, t, AppKey(m, int(n)), s, new_status) for p, t, m, n, s in rows]
    chosen = pk.in_([c.pk for c in changes])
    with self.engine.begin() as connection:
        # Journalled from what was read, as the seed would: the entries agree with the return.
        connection.execute(
            sa.insert(journal_table),
            [
                {"batch_id": "blind", "at": db.to_db_time(now), "action": rule.action,
                 "source": source, "table_name": host.tasks.name, "row_key": json.dumps([c.pk]),
                 "model_slug": c.key.model_slug, "app_number": c.key.app_number,
                 "old_status": c.old_status, "new_status": new_status,
                 "before_image": json.dumps({"id": c.pk, "task_id": c.task_id,
                                             "status": c.old_status})}
                for c in changes
            ],
        )
        connection.execute(
            sa.update(host.tasks)
            .where(chosen)
            .values(status=new_status, completed_at=db.to_db_time(now))
        )
    return len(changes), changes


def _failure_text(exc: BaseException) -> str:
    parts = [str(exc)]
    for inner in getattr(exc, "exceptions", ()):
        parts.append(_failure_text(inner))
    return " | ".join(parts)


def test_the_property_finds_a_lost_update_in_a_blind_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool that writes a status without comparing it to the one it read must be caught."""
    monkeypatch.setattr(changes, "_task_batch", _blind_task_batch)
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
        check = kwargs.pop("present_now", None)
        keys = list(keys)
        if check is not None:
            check(keys)
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
