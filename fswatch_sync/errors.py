"""Exceptions a user can cause, each rendered as one line by the command line."""

from __future__ import annotations


class FswatchSyncError(Exception):
    """Base class for errors that carry a message meant for the operator."""


class SettingsError(FswatchSyncError):
    """A setting has a value the program cannot use (exit status 2)."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class SweepRefused(FswatchSyncError):
    """The sweep's guard refused to act; nothing was changed (exit status 3).

    ``report`` is the refused sweep's report (the figures the guard judged), when one exists.
    """

    report: object = None


class RestoreConflict(FswatchSyncError):
    """A restore would collide with rows that exist now; nothing was restored."""


class SweepInterrupted(FswatchSyncError):
    """The sweep was stopped between two batches (the instance is shutting down); every batch
    is either committed whole or rolled back, and the next sweep finishes the work."""


class LeaseUnavailable(FswatchSyncError):
    """Another instance holds the maintenance lease, so this one may not sweep now."""
