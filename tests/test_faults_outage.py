"""Issue 5, item 2 — outages: the quick rounds of the outage scenarios (the long ones run from
``scripts/reliability``). PostgreSQL backends terminated and MariaDB connections killed while
removals flow, a SQLite file held locked by another writer, and memory during a long outage."""

from __future__ import annotations

from pathlib import Path

import faults.outage  # noqa: F401  (registers the scenarios)
import pytest
from faults import harness


@pytest.mark.postgres
def test_postgres_backends_terminated_mid_burst(tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("outage-pg-terminate", "postgres", tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


@pytest.mark.mysql
def test_mariadb_connections_killed_mid_burst(tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("outage-mysql-kill", "mysql", tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_sqlite_held_locked_by_another_writer(tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("outage-sqlite-locked", "sqlite", tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_memory_bounded_during_a_long_outage(tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("outage-memory", "sqlite", tmp_path)
    assert result.passed, f"{result.key}: {result.details}"
