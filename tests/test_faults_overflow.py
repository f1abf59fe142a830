"""Issue 5, item 4 — overflow: a real inotify queue overflow (the daemon frozen while a flood
fills the kernel's queue) and, as a clearly labelled fallback, the overflow injected at the
adapter; both must end in a sweep with trigger 'overflow' that removes the orphan whose event
was lost."""

from __future__ import annotations

from pathlib import Path

import faults.overflow  # noqa: F401  (registers the scenarios)
from faults import harness


def test_a_real_kernel_queue_overflow_is_followed_by_a_sweep(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("overflow-real", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_an_injected_overflow_is_followed_by_a_sweep(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("overflow-injected", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"
