"""The ``fswatch-sync`` command line: :func:`main` runs one command and turns what it raises into
one line on stderr and an exit status; it also sets up the tool's logging for the command.

Exit status: 0 success, 1 failure (including a database that is missing or has no tables for a
command that only reads), 2 bad settings or usage, 3 the sweep's guard refused.

The parser and the meaning of the arguments are :mod:`fswatch_sync.cli_args`, each command
:mod:`fswatch_sync.cli_commands`, what it prints :mod:`fswatch_sync.cli_output`, the databases it
opens :mod:`fswatch_sync.cli_store`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from sqlalchemy.exc import SQLAlchemyError

from fswatch_sync.cli_args import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SETTINGS,
    PROG,
    UsageError,
    build_parser,
    settings_from,
)
from fswatch_sync.cli_commands import COMMANDS
from fswatch_sync.cli_store import DatabaseNotReady, dispose_opened
from fswatch_sync.errors import (
    FswatchSyncError,
    LeaseUnavailable,
    RestoreConflict,
    SettingsError,
    SweepRefused,
)
from fswatch_sync.text import first_line, printable

# The command line's public names, importable from here whichever module holds them.
__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_SETTINGS",
    "PROG",
    "DatabaseNotReady",
    "UsageError",
    "build_parser",
    "configure_logging",
    "main",
]


class _OneLineFormatter(logging.Formatter):
    """Each record's message on one line, whatever name or error text went into it (only a
    traceback, appended after the message, spans lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fswatch_sync")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    base_flags: Mapping[str, Any] | None = None,
    *,
    prog: str = PROG,
    base_origins: Mapping[str, str] | None = None,
) -> int:
    """Run one command; ``base_flags`` are settings a host app configured (argv flags win),
    ``base_origins`` the names its errors give them, ``prog`` the name usage lines show."""
    out = out or sys.stdout
    try:
        args = build_parser(prog).parse_args(argv)
        # Early, so that what loading the settings warns about is seen; set again below.
        configure_logging("INFO")
        settings = settings_from(args, base_flags, base_origins)
        configure_logging(settings.log_level)
        code = COMMANDS[args.command](args, settings, out)
        out.flush()
        return code
    except BrokenPipeError:
        # The reader went away (``| head``): the rest of the output has nowhere to go. Point
        # stdout at /dev/null so that the interpreter's last flush cannot fail a second time.
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_FAILURE
    except UsageError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_SETTINGS
    except SettingsError as exc:
        sys.stderr.write(f"{prog}: error: {printable(str(exc))}\n")
        return EXIT_SETTINGS
    except SweepRefused as exc:  # pragma: no cover - handled in cmd_sweep
        sys.stderr.write(f"{prog}: refused: {printable(str(exc))}\n")
        return EXIT_REFUSED
    except (RestoreConflict, LeaseUnavailable, FswatchSyncError) as exc:
        # A restore conflict names the app: one line whatever its slug holds.
        sys.stderr.write(f"{prog}: {printable(str(exc))}\n")
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        sys.stderr.write(f"{prog}: database error: {first_line(exc)}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    finally:
        dispose_opened()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
