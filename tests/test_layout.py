"""Layout: ``{root}/{model_slug}/app{N}/`` <-> AppKey, and the scan that never leaves the root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fswatch_sync.layout import (
    MAX_APP_NUMBER,
    AppKey,
    app_dir,
    app_exists,
    is_safe_slug,
    key_for_path,
    model_dirs,
    parse_app_dir_name,
    root_present,
    scan_apps,
    scan_tree,
    slug_for_path,
)

# -- pure parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("app0", 0),
        ("app1", 1),
        ("app123", 123),
        ("app2147483648", 2**31),  # past INTEGER: a host's BIGINT column holds it
        ("app99999999999", 99999999999),
        (f"app{MAX_APP_NUMBER}", MAX_APP_NUMBER),
    ],
)
def test_plain_decimal_app_names_match(name: str, number: int) -> None:
    assert parse_app_dir_name(name) == number


@pytest.mark.parametrize(
    "name",
    [
        "app",
        "app01",
        "app00",
        "app-1",
        "app+1",
        "App1",
        "APP1",
        "app1x",
        "xapp1",
        "app 1",
        "app1 ",
        " app1",
        "app1\n",
        "app1.bak",
        "app1/",
        "app\u0661",  # ARABIC-INDIC DIGIT ONE: a decimal digit to str.isdigit, not to us
        "app\uff11",  # FULLWIDTH DIGIT ONE
        "app1_0",
        "app0x10",
        f"app{MAX_APP_NUMBER + 1}",
        "app" + "9" * 19,  # past BIGINT, one digit longer than it
        "app" + "9" * 40,
        "",
    ],
)
def test_anything_else_is_not_an_app(name: str) -> None:
    assert parse_app_dir_name(name) is None


@given(st.integers(min_value=0, max_value=MAX_APP_NUMBER))
def test_every_valid_number_round_trips(number: int) -> None:
    assert parse_app_dir_name(f"app{number}") == number


@given(st.text(max_size=15))
def test_a_match_is_always_the_canonical_spelling(name: str) -> None:
    number = parse_app_dir_name(name)
    if number is not None:
        assert name == f"app{number}"
        assert 0 <= number <= MAX_APP_NUMBER


@pytest.mark.parametrize(
    "slug",
    [
        "openai_gpt-4", "m", "a.b", "x..y", "模型", "-dash", "app1",
        # Legal directory names an older rule refused: their apps were taken for orphans.
        "~", "~root", "~user", "a\\b", "\\", "with space", " lead", "trail ", "new\nline",
        "tab\tname", "\x1b[31mred", "...", ".hidden", "x" * 255,
    ],
)
def test_ordinary_slugs_are_safe(slug: str) -> None:
    assert is_safe_slug(slug)


UNSAFE_SLUGS = [
    "",
    ".",
    "..",
    "a/b",
    "../x",
    "/abs",
    "/",
    "a\x00b",
    "\x00",
    "bad\udcffname",  # what os.fsdecode makes of a non-UTF-8 byte
]


@pytest.mark.parametrize("slug", UNSAFE_SLUGS)
def test_slugs_that_could_escape_the_root_never_match(slug: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert not is_safe_slug(slug)
    assert app_dir(root, AppKey(slug, 1)) is None
    assert not app_exists(root, AppKey(slug, 1))


def test_app_dir_and_key_for_path_are_inverse() -> None:
    root = Path("/srv/generated/apps")
    key = AppKey("openai_gpt-4", 123)
    path = app_dir(root, key)
    assert path == root / "openai_gpt-4" / "app123"
    assert path is not None
    assert key_for_path(root, path) == key
    assert key_for_path(root, str(path) + "/") == key


@pytest.mark.parametrize(
    "path",
    [
        "/srv/generated/apps",
        "/srv/generated/apps/m",
        "/srv/generated/apps/m/app1/src",
        "/srv/generated/apps/m/app01",
        "/srv/generated/apps/m/notes.txt",
        "/srv/generated/apps-old/m/app1",
        "/srv/generated/app/m/app1",
        "/srv/generated/apps/../apps2/m/app1",
        "/srv/generated/apps/m/../../x/app1",
        "/elsewhere/m/app1",
        "relative/m/app1",
        "/srv/generated/apps/a\x00b/app1",
        "/srv/generated/apps/bad\udcffname/app1",
    ],
)
def test_paths_that_are_not_exactly_root_slug_app_give_no_key(path: str) -> None:
    assert key_for_path(Path("/srv/generated/apps"), path) is None


def test_key_for_path_range() -> None:
    root = Path("/r")
    assert key_for_path(root, f"/r/m/app{MAX_APP_NUMBER}") == AppKey("m", MAX_APP_NUMBER)
    assert key_for_path(root, f"/r/m/app{MAX_APP_NUMBER + 1}") is None
    assert app_dir(root, AppKey("m", -1)) is None
    assert app_dir(root, AppKey("m", MAX_APP_NUMBER + 1)) is None


def test_slug_for_path() -> None:
    root = Path("/r")
    assert slug_for_path(root, "/r/model") == "model"
    assert slug_for_path(root, "/r") is None
    assert slug_for_path(root, "/r/model/app1") is None
    assert slug_for_path(root, "/r/..") is None
    assert slug_for_path(root, "/other/model") is None


# -- the scan ----------------------------------------------------------------------------------


def _mkdirs(root: Path, *relative: str) -> None:
    for item in relative:
        (root / item).mkdir(parents=True, exist_ok=True)


def test_scan_finds_exactly_the_real_app_directories(tmp_path: Path) -> None:
    root = tmp_path / "apps"
    outside = tmp_path / "outside"
    _mkdirs(root, "m1/app1", "m1/app2/node_modules/app3", "m2/app10", "m2/app0", "empty")
    _mkdirs(outside, "app7", "modelx/app8")
    # Directories whose names are not apps.
    _mkdirs(root, "m1/app01", "m1/app-1", "m1/App4", "m1/app", "m1/app5x", "m1/app" + "9" * 20)
    # Files named like apps, in a model directory and directly in the root.
    (root / "m1" / "app6").write_text("not a directory")
    (root / "app9").mkdir()  # an app name where a model directory belongs: a model called app9
    (root / "README").write_text("x")
    # Symlinks: to an app inside the root, to a directory outside it, dangling; and a model
    # directory that is itself a symlink (inside and outside the root).
    os.symlink(root / "m1" / "app1", root / "m1" / "app11")
    os.symlink(outside / "app7", root / "m1" / "app12")
    os.symlink(tmp_path / "nowhere", root / "m1" / "app13")
    os.symlink(root / "m2", root / "m3")
    os.symlink(outside / "modelx", root / "m4")
    os.symlink(tmp_path / "nowhere", root / "m5")

    assert scan_apps(root) == {
        AppKey("m1", 1),
        AppKey("m1", 2),
        AppKey("m2", 10),
        AppKey("m2", 0),
    }
    assert set(model_dirs(root)) == {"m1", "m2", "empty", "app9"}


def test_scan_skips_non_utf8_and_unsafe_names(tmp_path: Path) -> None:
    root = tmp_path / "apps"
    root.mkdir()
    os.mkdir(os.fsencode(root) + b"/bad\xffslug")
    os.mkdir(os.fsencode(root) + b"/bad\xffslug/app1")
    _mkdirs(root, "good/app1")
    os.mkdir(os.fsencode(root) + b"/good/app\xff2")
    assert scan_apps(root) == {AppKey("good", 1)}


def test_scan_of_given_slugs_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "base" / "apps"
    _mkdirs(root, "m/app1")
    _mkdirs(tmp_path / "base", "evil/app5")
    _mkdirs(tmp_path, "outside/app6")
    os.symlink(tmp_path / "outside", root / "linked")
    slugs = ["m", "../evil", "..", str(tmp_path / "outside"), "linked", "missing", "a\x00b"]
    assert scan_apps(root, slugs) == {AppKey("m", 1)}


def test_scan_of_missing_root_or_model_is_empty(tmp_path: Path) -> None:
    assert scan_apps(tmp_path / "missing") == set()
    assert scan_apps(tmp_path, ["missing"]) == set()
    (tmp_path / "file").write_text("x")
    assert scan_apps(tmp_path / "file") == set()


def test_app_exists_only_for_real_directories_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "apps"
    outside = tmp_path / "outside"
    _mkdirs(root, "m/app1", "real/app3")
    _mkdirs(outside, "app2", "model/app4")
    os.symlink(outside / "app2", root / "m" / "app2")
    os.symlink(outside / "model", root / "linked")
    (root / "m" / "app5").write_text("file")
    os.symlink(tmp_path / "nowhere", root / "m" / "app6")

    assert app_exists(root, AppKey("m", 1))
    assert app_exists(root, AppKey("real", 3))
    assert not app_exists(root, AppKey("m", 2))  # symlink to a directory outside the root
    assert not app_exists(root, AppKey("linked", 4))  # model directory is a symlink
    assert not app_exists(root, AppKey("m", 5))  # a file
    assert not app_exists(root, AppKey("m", 6))  # dangling symlink
    assert not app_exists(root, AppKey("m", 7))  # nothing there
    assert not app_exists(root, AppKey("..", 1))
    assert not app_exists(tmp_path / "missing", AppKey("m", 1))


def test_root_that_is_itself_a_symlink_is_followed(tmp_path: Path) -> None:
    """An operator may point the root at a mount through a symlink; apps below it are real."""
    volume = tmp_path / "volume"
    _mkdirs(volume, "m/app1")
    root = tmp_path / "apps"
    os.symlink(volume, root)
    assert root_present(root)
    assert scan_apps(root) == {AppKey("m", 1)}
    assert app_exists(root, AppKey("m", 1))
    assert not app_exists(root, AppKey("m", 2))


def test_app_exists_agrees_with_scan(tmp_path: Path) -> None:
    root = tmp_path / "apps"
    _mkdirs(root, "a/app1", "a/app2", "b/app3")
    os.symlink(root / "a" / "app1", root / "b" / "app4")
    present = scan_apps(root)
    for key in [AppKey("a", 1), AppKey("a", 2), AppKey("b", 3), AppKey("b", 4), AppKey("c", 1)]:
        assert app_exists(root, key) == (key in present)


def test_root_present_and_marker(tmp_path: Path) -> None:
    root = tmp_path / "apps"
    assert not root_present(root)
    root.mkdir()
    assert root_present(root)
    assert not root_present(root, ".mounted")
    (root / ".mounted").write_text("")
    assert root_present(root, ".mounted")
    (tmp_path / "file").write_text("")
    assert not root_present(tmp_path / "file")


# -- what cannot be read is not absent ----------------------------------------------------------


def _deny(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    denied: Path,
    error: int = 13,
    *,
    below: bool = False,
) -> None:
    """Make ``os.<name>`` fail with ``error`` (EACCES) for ``denied`` (and, with ``below``, for
    every path under it, as when a directory has no search permission)."""
    real = getattr(os, name)

    def fake(path: Any, *args: Any, **kwargs: Any) -> Any:
        # The layout lists and looks up through descriptors (no symlink followed): name the
        # path a descriptor, or a name relative to one, stands for.
        if isinstance(path, int):
            text = os.readlink(f"/proc/self/fd/{path}")
        elif kwargs.get("dir_fd") is not None:
            text = os.path.join(os.readlink(f"/proc/self/fd/{kwargs['dir_fd']}"), path)
        else:
            text = os.fspath(path)
        if text == os.fspath(denied) or (below and text.startswith(os.fspath(denied) + "/")):
            raise OSError(error, os.strerror(error), text)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, name, fake)


def test_a_model_directory_that_cannot_be_listed_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "apps"
    _mkdirs(root, "open/app1", "locked/app2", "locked/app3")
    _deny(monkeypatch, "scandir", root / "locked")
    scan = scan_tree(root)
    assert scan.present == {AppKey("open", 1)}
    assert scan.unreadable == {"locked"}
    assert scan.root_listed
    assert scan_tree(root, ["locked", "missing"]).unreadable == {"locked"}


def test_a_root_that_cannot_be_listed_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "apps"
    _mkdirs(root, "m/app1")
    _deny(monkeypatch, "scandir", root, error=5)  # EIO
    scan = scan_tree(root)
    assert not scan.root_listed
    assert scan.present == set()


def test_app_exists_is_false_only_when_absence_is_proven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "apps"
    _mkdirs(root, "m/app1")
    _deny(monkeypatch, "lstat", root / "m" / "app1")
    assert app_exists(root, AppKey("m", 1))  # cannot tell: not proven absent
    _deny(monkeypatch, "lstat", root / "m", below=True)  # m cannot be searched
    assert app_exists(root, AppKey("m", 2))
    assert not app_exists(root, AppKey("other", 1))  # ENOENT: proven absent
