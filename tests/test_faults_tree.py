"""Issue 11, points 3 and 6 — the quick rounds of ``tree-model-mount`` (a tmpfs over one model
directory) and ``tree-root-rm-rf`` (rm -rf of a watched root of 200 apps); the long rounds run
from ``scripts/reliability``."""

from __future__ import annotations

from pathlib import Path

import faults.tree  # noqa: F401  (registers the scenarios)
import pytest
from faults import harness


@pytest.mark.parametrize("name", ["tree-model-mount", "tree-root-rm-rf"])
def test_tree_quick_rounds(name: str, backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest(name, backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"
