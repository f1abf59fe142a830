"""Issue 11 — the quick rounds of ``legal-names`` and ``poison-row`` (the long ones run from
``scripts/reliability``), on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from pathlib import Path

import faults.safety  # noqa: F401  (registers the scenarios)
import pytest
from faults import harness


@pytest.mark.parametrize("name", ["legal-names", "poison-row"])
def test_quick_rounds(name: str, backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest(name, backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"
