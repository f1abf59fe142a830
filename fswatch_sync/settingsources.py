"""Reading the sources settings come from besides flags: the TOML settings file and the
``FSWATCH_SYNC_*`` environment.

The file is read bounded and without blocking (a FIFO, a device or a huge file is refused in one
line, not waited on or loaded); an environment variable that names no setting is reported, since
it is most likely a typo that would otherwise be silently ignored.
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fswatch_sync.errors import SettingsError
from fswatch_sync.settingspecs import ENV_PREFIX, SPECS

CONFIG_ENV = "FSWATCH_SYNC_CONFIG"
# Variables of this project's own test, benchmark and fault tooling: not settings, not typos.
_TOOLING_ENV_PREFIXES = ("FSWATCH_SYNC_TEST_", "FSWATCH_SYNC_BENCH_", "FSWATCH_SYNC_FAULT_")
_TOOLING_ENV = frozenset({
    "FSWATCH_SYNC_CHILD", "FSWATCH_SYNC_REQUIRE_DATABASES", "FSWATCH_SYNC_RELIABILITY_COMMAND",
})
# A settings file is a few kilobytes; the cap keeps /dev/zero or a huge file from eating memory.
MAX_CONFIG_BYTES = 1024 * 1024


def _read_config_bytes(path: Path) -> bytes:
    shown = repr(str(path))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SettingsError("config", f"file {shown} does not exist") from None
    except OSError as exc:
        raise SettingsError("config", f"cannot read {shown}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SettingsError("config", f"{shown} is not a regular file")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise SettingsError(
                    "config", f"{shown} is larger than {MAX_CONFIG_BYTES // 1024} KiB"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise SettingsError("config", f"cannot read {shown}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TOML settings file as a table; SettingsError (one line) for anything unusable."""
    path = Path(path)
    data = _read_config_bytes(path)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SettingsError("config", f"{str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError("config", f"{str(path)!r} is not valid TOML: {exc}") from None
    except RecursionError:
        raise SettingsError("config", f"{str(path)!r} nests tables or arrays too deeply") from None


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``FSWATCH_SYNC_*`` variables that name no setting: each a likely typo, said once."""
    known = {spec.env for spec in SPECS} | {CONFIG_ENV} | _TOOLING_ENV
    messages = []
    for name in sorted(environ):
        if (
            not name.startswith(ENV_PREFIX)
            or name in known
            or name.startswith(_TOOLING_ENV_PREFIXES)
        ):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        messages.append(f"environment variable {name} is not a setting; ignored{hint}")
    return messages

