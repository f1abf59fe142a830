"""Where an app lives on disk: ``{root}/{model_slug}/app{N}/`` and back again.

Parsing is pure; the few helpers that touch the disk never follow a symbolic link and never read
outside the root: a slug that could escape it (``/``, ``..``, NUL, absolute) never names a
directory, so such an app is simply absent. Any other name the filesystem can hold is a slug —
``~user``, ``a\\b``, spaces, newlines — since a directory that exists under such a name must never
be taken for an orphan.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from fswatch_sync.text import printable

# The widest app-number column a host can have (and the journal's) is a signed 64-bit BIGINT: a
# larger number can never be a row, so a directory carrying one is not an app.
MAX_APP_NUMBER = 2**63 - 1


class AppKey(NamedTuple):
    """One generated application, as the database and the directory tree both name it."""

    model_slug: str
    app_number: int

    def __str__(self) -> str:
        # The display form, for logs and tables: control characters in a slug are escaped so a
        # name can never forge a line. Anything that needs the real slug uses ``model_slug``.
        return f"{printable(self.model_slug)}/app{self.app_number}"


# The longest number an app directory's name may carry: 19 digits, the most a BIGINT has.
_MAX_DIGITS = 19


def parse_app_dir_name(name: str) -> int | None:
    """``app123`` -> 123; anything else (``app``, ``app01``, ``app-1``, ``App1``, other scripts'
    digits) -> None. A sweep parses every app directory's name: string tests, no pattern."""
    digits = name[3:]
    if (
        not name.startswith("app")
        or not digits.isascii()
        or not digits.isdigit()
        or len(digits) > _MAX_DIGITS
        or (digits[0] == "0" and len(digits) > 1)
    ):
        return None
    number = int(digits)
    return number if number <= MAX_APP_NUMBER else None


def is_safe_slug(slug: str) -> bool:
    """True when ``slug`` names exactly one directory directly inside the root.

    That is any single path component: no separator, not ``.`` or ``..``, no NUL. Nothing else is
    excluded — no tilde or shell expansion ever happens to a path built here, and a backslash is
    an ordinary character on POSIX.
    """
    return (
        bool(slug)
        and slug not in (".", "..")
        and "/" not in slug
        and os.sep not in slug
        and (os.altsep is None or os.altsep not in slug)
        and "\x00" not in slug
        and _is_utf8(slug)
    )


def _is_utf8(text: str) -> bool:
    # A directory name that is not UTF-8 arrives with surrogate escapes; it can never equal a
    # slug stored in the database, and binding it as a parameter would fail.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_dir(key: AppKey) -> bool:
    """Whether ``key`` can name a directory under the root at all (a slug that could escape
    it, or a number no directory name carries, never does)."""
    return is_safe_slug(key.model_slug) and 0 <= key.app_number <= MAX_APP_NUMBER


def app_dir(root: Path, key: AppKey) -> Path | None:
    """The directory of ``key`` under ``root``, or None when the slug could escape the root."""
    if not has_dir(key):
        return None
    return root / key.model_slug / f"app{key.app_number}"


def key_for_path(root: Path, path: str | os.PathLike[str]) -> AppKey | None:
    """The app a path names when it is exactly ``root/slug/appN`` (pure, no I/O)."""
    try:
        relative = Path(os.path.normpath(path)).relative_to(os.path.normpath(root))
    except ValueError:
        return None
    parts = relative.parts
    if len(parts) != 2 or not is_safe_slug(parts[0]):
        return None
    number = parse_app_dir_name(parts[1])
    return None if number is None else AppKey(parts[0], number)


def slug_for_path(root: Path, path: str | os.PathLike[str]) -> str | None:
    """The model slug a path names when it is exactly ``root/slug`` (pure, no I/O)."""
    try:
        relative = Path(os.path.normpath(path)).relative_to(os.path.normpath(root))
    except ValueError:
        return None
    parts = relative.parts
    return parts[0] if len(parts) == 1 and is_safe_slug(parts[0]) else None


# Errors that prove a path is not there. Any other (EACCES, EIO, ESTALE...) proves nothing.
_ABSENT = (FileNotFoundError, NotADirectoryError)


def _proves_absence(exc: OSError) -> bool:
    # ENAMETOOLONG: no directory can carry a name longer than the filesystem allows, so a row
    # with such a slug (a host column may be wider than NAME_MAX) has no directory.
    return isinstance(exc, _ABSENT) or exc.errno == errno.ENAMETOOLONG


def _dir_state(path: Path, *, follow: bool) -> bool | None:
    """True: a directory; False: provably not one (absent, a file, a symlink); None: unknown."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except ValueError:
        return False
    except OSError as exc:
        return False if _proves_absence(exc) else None
    return stat.S_ISDIR(mode)


def app_exists(root: Path, key: AppKey) -> bool:
    """False only when the app's directory is provably not there as a real directory.

    The root itself may be a symlink (to a mounted volume, say), exactly as :func:`scan_apps`
    follows it; the model and app directories below it must be real directories. A path that
    cannot be examined (permission denied, I/O error) is not proof of absence: it counts as
    present, so nothing is removed on the strength of an error.
    """
    return key in apps_present(root, [key])


def apps_present(root: Path, keys: Iterable[AppKey]) -> set[AppKey]:
    """The keys among ``keys`` whose directory :func:`app_exists` finds (or cannot prove gone):
    one look at the root and one handle per model directory, however many keys."""
    by_slug: dict[str, list[AppKey]] = {}
    for key in keys:
        if has_dir(key):
            by_slug.setdefault(key.model_slug, []).append(key)
    # In order, stopping at the first proof of absence: past a model "directory" that is a
    # symlink, the app would be looked up outside the root.
    if not by_slug or _dir_state(root, follow=True) is False:
        return set()
    present: set[AppKey] = set()
    for slug, members in by_slug.items():
        present.update(_present_in_model(root / slug, members))
    return present


def _present_in_model(model: Path, keys: list[AppKey]) -> list[AppKey]:
    """The keys whose ``app{N}`` is a real directory in ``model`` (or cannot be proved not to
    be), ``model`` itself a real directory: it is opened without following a symlink and each
    app looked up through that handle, so a model directory swapped for a symlink meanwhile never
    leads a lookup outside the root."""
    try:
        handle = os.open(model, _DIR_HANDLE_FLAGS)
    except OSError as exc:
        # ELOOP: a symlink, not a directory. Anything else that proves nothing: all unknown.
        return [] if _proves_absence(exc) or exc.errno == errno.ELOOP else keys
    except ValueError:
        return []
    present = []
    try:
        for key in keys:
            try:
                mode = os.lstat(f"app{key.app_number}", dir_fd=handle).st_mode
            except OSError as exc:
                if not _proves_absence(exc):
                    present.append(key)
                continue
            if stat.S_ISDIR(mode):
                present.append(key)
    finally:
        os.close(handle)
    return present


# A handle on a directory that only names it (no read permission needed), where Linux has one.
_DIR_HANDLE_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW


def root_present(root: Path, marker: str = "") -> bool:
    """The root is a directory (and holds the marker file when one is configured)."""
    if not os.path.isdir(root):
        return False
    return not marker or os.path.isfile(root / marker)


def _open_listing(directory: Path | str, follow: bool) -> int | Path | str:
    """What to hand ``os.scandir``: the path itself (the root, which may be a symlink), or a
    descriptor opened without following one (a model directory: checked to be real when its
    name was listed, it may have been swapped for a symlink since; ELOOP then)."""
    if follow:
        return directory
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _real_subdirs(directory: Path | str, *, follow: bool = True) -> Iterator[str]:
    try:
        target = _open_listing(directory, follow)
    except OSError:
        return
    try:
        with os.scandir(target) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        yield entry.name
                except OSError:
                    continue
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    finally:
        if isinstance(target, int):
            os.close(target)


def model_dirs(root: Path) -> Iterator[str]:
    """Slugs of the real model directories directly inside the root."""
    return (name for name in _real_subdirs(root) if is_safe_slug(name))


def _list_subdirs(directory: Path | str, *, follow: bool = True) -> list[str] | None:
    """Names of the real subdirectories; [] when the directory is not there (or, with
    ``follow`` False, is a symlink); None when it could not be listed (permission denied, I/O
    error), which proves nothing about its apps."""
    names: list[str] = []
    try:
        target = _open_listing(directory, follow)
    except _ABSENT:
        return []
    except OSError as exc:
        return [] if exc.errno == errno.ELOOP else None
    try:
        with os.scandir(target) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    names.append(entry.name)
    except _ABSENT:
        return []
    except OSError:
        return None
    finally:
        if isinstance(target, int):
            os.close(target)
    return names


# The app directories a scan found, as (slug, number) tuples: equal to, and found by, AppKeys.
PresentKeys = set[tuple[str, int]]


class Scan(NamedTuple):
    """What one scan of the tree saw."""

    present: PresentKeys
    # Model directories that exist but could not be listed: their apps are of unknown presence.
    unreadable: frozenset[str]
    # False when the root itself could not be listed: nothing is known about any app.
    root_listed: bool


def scan_tree(root: Path, slugs: Iterable[str] | None = None) -> Scan:
    """Every app directory present under the root: one ``scandir`` per model directory.

    ``slugs`` limits the scan to those model directories; one that could escape the root or is
    not a real directory (a symlink, say) is skipped, exactly as a full scan would skip it.
    """
    present: PresentKeys = set()
    unreadable: set[str] = set()
    if slugs is None:
        listed = _list_subdirs(root)
        if listed is None:
            return Scan(set(), frozenset(), root_listed=False)
        chosen: Iterable[str] = (name for name in listed if is_safe_slug(name))
    else:
        chosen = (
            slug for slug in slugs if is_safe_slug(slug) and _dir_state(root / slug, follow=False)
        )
    for slug in chosen:
        names = _list_subdirs(os.path.join(root, slug), follow=False)
        if names is None:
            unreadable.add(slug)
            continue
        for name in names:
            number = parse_app_dir_name(name)
            if number is not None:
                # A plain tuple, equal to the AppKey: a set of tens of thousands of plain
                # tuples of a str and an int is untracked by the garbage collector.
                present.add((slug, number))
    return Scan(present, frozenset(unreadable), root_listed=True)


def scan_apps(root: Path, slugs: Iterable[str] | None = None) -> PresentKeys:
    """The app directories :func:`scan_tree` finds (unreadable directories contribute none)."""
    return scan_tree(root, slugs).present


def any_app_dir(root: Path) -> bool:
    """Whether at least one app directory exists (stops at the first one found)."""
    for slug in model_dirs(root):
        for name in _real_subdirs(os.path.join(root, slug), follow=False):
            if parse_app_dir_name(name) is not None:
                return True
    return False
