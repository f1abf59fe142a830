"""Fault scenarios (issue 5): crashes, outages, races, overflow, hostile input.

Every scenario registers itself in :mod:`faults.harness` with ``@scenario(...)``; the quick rounds
run under pytest (``tests/test_faults_*.py``), the long rounds from ``scripts/reliability``, which
writes one JSON result per scenario and generates ``docs/reliability.md`` from them.
"""
