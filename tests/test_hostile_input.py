"""Issue 5, item 5 — hostile input: no crash, no wrong removal, nothing outside the root read.

The scenarios live in ``tests/faults/hostile.py`` and are registered with the fault harness; the
tests here run their quick rounds (the long rounds run from ``scripts/reliability``), plus a
positive control proving that the witnesses of reading outside the root do see such reads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import faults.hostile  # noqa: F401  (registers the scenarios)
import pytest
from faults import harness
from faults.hostile import build_tree, witnesses


def test_hostile_tree_through_the_sweep(backend: str, tmp_path: Path) -> None:
    # The random extras of round 2 on SQLite only: the servers are slow to set up here.
    rounds = None if backend == "sqlite" else 1
    result = harness.run_quick_in_pytest("hostile-tree-sweep", backend, tmp_path, rounds=rounds)
    assert result.passed, f"{result.key}: {result.details}"


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_hostile_tree_through_a_running_service(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("hostile-tree-service", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_hostile_settings_stop_with_exit_2_and_one_line(tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("hostile-settings", None, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_the_witnesses_see_a_read_outside(tmp_path: Path) -> None:
    """Positive control: the same witnesses do see reads outside, direct or through a symlink,
    from this thread and from another one; so their silence in the scenarios means something."""
    tree = build_tree(tmp_path, "sqlite")
    outside = tree.outside[0]
    with witnesses(tree) as seen:
        assert seen.seen() == []
        worker = threading.Thread(target=lambda: os.listdir(tree.root / "evil"))
        worker.start()
        worker.join()
        audit_reads = [r for r in seen.seen() if r.startswith("audit")]
        # Recorded under the path used: a read through the symlink counts as a read outside.
        assert audit_reads == [f"audit os.listdir {tree.root / 'evil'}"], audit_reads
        (outside / "app1" / "secret.txt").read_text()
        with os.scandir(tree.root / "m" / "app10"):
            pass
        reads = seen.seen()
    assert any("secret.txt: open" in r for r in reads if r.startswith("inotify")), reads
    assert any(r.startswith("audit os.scandir") and "app10" in r for r in reads), reads


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_root_whose_path_is_not_utf8(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("hostile-root-path", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_a_model_dir_swapped_for_a_symlink_mid_scan(tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("hostile-symlink-swap", None, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_look_alike_model_names(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("hostile-collation", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"
