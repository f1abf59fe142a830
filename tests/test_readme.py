"""The README, run: every shell command and every Python snippet in it works as written, against
a scratch root and SQLite, so that the document cannot drift from the program.

- ```sh blocks: each line is run by bash in one scratch directory, in order, with this
  environment's ``fswatch-sync`` first on PATH; a trailing ``# exit N`` states the expected exit
  status (0 otherwise).
- The newcomer commands (the indented blocks at the top): every step is run except the venv
  creation and ``pip install`` (this environment is that venv; ``FSWATCH_SYNC_TEST_NEWCOMER=1``
  runs them too, on a fresh copy) and the test suite itself; ``fswatch-sync run`` is started and
  stopped with SIGTERM.
- Every command synopsis (``fswatch-sync CMD [--flag] ...``): each flag is in ``CMD --help``.
- ```python blocks run in a scratch directory; placeholders a snippet only names (a cache, a
  task runner, an Alembic ``context``) are given as stubs, nothing else is.
- The ```toml block parses into valid settings and schema mapping.
- The default tables' columns are the ones ``init-db`` creates.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import wait_until

from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.settingspecs import SPECS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def indented_commands() -> list[str]:
    """Indented lines at the top of the README that are shell commands."""
    return [
        line.strip() for line in README.splitlines()
        if line.startswith("    python3 -m venv")
    ]


def environ(scratch: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(scratch)
    return env


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


def bash(line: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=environ(cwd), capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def test_every_sh_block_runs_as_written(scratch: Path) -> None:
    blocks = fenced("sh")
    assert blocks, "the README has no ```sh block"
    ran = 0
    for block in blocks:
        for raw in block.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            expected = 0
            match = re.search(r"#\s*exit (\d+)", line)
            if match:
                expected = int(match.group(1))
            command = line.split("  #", 1)[0].strip()
            result = bash(command, scratch)
            assert result.returncode == expected, (command, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr, (command, result.stderr)
            if expected:
                assert len(result.stderr.strip().splitlines()) == 1, (command, result.stderr)
            ran += 1
    assert ran >= 5
    # The session's state is what the commands say: a database made where the README says.
    assert (scratch / "fswatch_sync.db").is_file()


def test_the_newcomer_commands(scratch: Path) -> None:
    commands = indented_commands()
    assert len(commands) == 2, commands
    run_line, test_line = commands
    steps = [step.strip() for step in run_line.split("&&")]
    assert steps[0] == "python3 -m venv .venv"
    assert steps[1].startswith(".venv/bin/pip install")
    assert steps[-1] == ".venv/bin/fswatch-sync run"
    # The extras the second line installs exist.
    extras = re.findall(r"\.\[([a-z,]+)\]", test_line)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for extra in ",".join(extras).split(","):
        if extra:
            assert extra in pyproject["project"]["optional-dependencies"], extra
    for step in steps[2:-1]:
        assert bash(step, scratch).returncode == 0, step
    process = subprocess.Popen(
        [str(BIN / "fswatch-sync"), *shlex.split(steps[-1])[1:]], cwd=scratch,
        env=environ(scratch), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    try:
        def started() -> bool:
            line = process.stderr.readline() if process.stderr else ""
            lines.append(line)
            return " started " in line or process.poll() is not None

        wait_until(started, 30, "fswatch-sync run to start")
        assert process.poll() is None, "".join(lines)
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)
    assert process.returncode == 0, "".join(lines) + err
    assert "Traceback" not in "".join(lines) + err


@pytest.mark.skipif(
    os.environ.get("FSWATCH_SYNC_TEST_NEWCOMER") != "1",
    reason="installs into a fresh venv (slow): set FSWATCH_SYNC_TEST_NEWCOMER=1",
)
def test_the_newcomer_commands_on_a_fresh_copy(tmp_path: Path) -> None:
    copy = tmp_path / "clone"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".venv", "*.egg-info", "__pycache__", ".git", "*.db"))
    run_line = indented_commands()[0].removesuffix(" && .venv/bin/fswatch-sync run")
    result = bash(run_line, copy, timeout=600)
    assert result.returncode == 0, result.stderr
    version = subprocess.run([str(copy / ".venv/bin/fswatch-sync"), "--version"],
                             capture_output=True, text=True, check=False, timeout=60)
    assert version.returncode == 0, version.stderr


def synopses() -> list[tuple[str, list[str]]]:
    found = []
    for text in re.findall(r"`fswatch-sync ([a-z-]+)((?: [^`]*)?)`", README):
        command, rest = text
        found.append((command, re.findall(r"--[a-z][a-z-]*", rest)))
    return found


def test_every_documented_flag_exists(scratch: Path) -> None:
    documented = synopses()
    assert len(documented) >= 8
    helps: dict[str, str] = {}
    for command, flags in documented:
        if command not in helps:
            result = subprocess.run(
                [str(BIN / "fswatch-sync"), command, "--help"], cwd=scratch,
                env=environ(scratch), capture_output=True, text=True, timeout=60, check=False,
            )
            assert result.returncode == 0, (command, result.stderr)
            helps[command] = result.stdout
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", helps[command]), (command, flag)


class _Recorder:
    """Stands in for an object a snippet only names (a cache, a task runner)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **_kwargs: Any) -> None:
            self.calls.append((name, args))

        return record


def test_every_python_snippet_runs(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippets = fenced("python")
    assert len(snippets) >= 5
    monkeypatch.chdir(scratch)
    for name in list(os.environ):
        if name.startswith(("FSWATCH_SYNC_", "MAINTENANCE_")):
            monkeypatch.delenv(name)
    (scratch / "generated" / "apps" / "openai_gpt-4" / "app1").mkdir(parents=True)
    for snippet in snippets:
        namespace: dict[str, Any] = {
            "__name__": "readme_snippet",
            "cache": _Recorder(),
            "runner": _Recorder(),
            "db": SimpleNamespace(metadata=sa.MetaData()),
            "context": SimpleNamespace(configure=lambda *args, **kwargs: None),
        }
        try:
            exec(compile(snippet, "README.md", "exec"), namespace)
            if "create_app" in namespace:  # the Flask snippet: an app is made from it
                app = namespace["create_app"]()
                assert "fswatch_sync" in app.extensions
            if "include_object" in namespace:
                assert not namespace["include_object"](None, "fswatch_sync_journal", "table",
                                                        True, None)
        finally:
            service = namespace.get("service")
            if service is not None:
                service.stop()
    from fswatch_sync import signals

    # The signals snippet's receivers are connected; disconnect them again.
    for signal_name in ("app_removed", "task_cancelled"):
        for receiver in list(getattr(signals, signal_name).receivers.values()):
            target = receiver() if callable(receiver) else receiver
            if getattr(target, "__module__", None) == "readme_snippet":
                getattr(signals, signal_name).disconnect(target)


def test_the_toml_example_is_valid() -> None:
    (block,) = fenced("toml")
    data = tomllib.loads(block)
    schema = data.pop("schema")
    names = {spec.name for spec in SPECS}
    assert set(data) <= names, set(data) - names
    config = SchemaConfig.from_mapping(schema)
    assert not config.manage_host_tables


def test_the_default_tables_are_documented_as_created() -> None:
    metadata = default_host_metadata(SchemaConfig())
    for table in metadata.sorted_tables:
        # From the name to the ")" that ends the block: the next table, or a blank line.
        pattern = rf"^ {{4}}{table.name}\((.*?)\)\n(?= {{4}}[a-z]|\n)"
        match = re.search(pattern, README, flags=re.M | re.S)
        assert match, f"{table.name} is not described"
        described = re.findall(r"(?:^|,)\s*([a-z_]+) [A-Z]", match.group(1))
        assert described == [column.name for column in table.columns], table.name
