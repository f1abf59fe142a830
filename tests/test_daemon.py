"""``fswatch-sync run`` as a real process: signals, exit status, heartbeat, status from outside.

The daemon is started with ``python -m fswatch_sync run`` and only the environment the SPEC
names; every check reads the database (or runs ``fswatch-sync status`` as another process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    SLUG,
    assert_removed,
    finished_sweeps,
    has_row,
    init_database,
    instance_rows,
    probe_engine,
    seed_app,
    sqlite_url,
    wait_until,
)
from sqlalchemy.engine import Engine

from fswatch_sync.layout import AppKey

REPO = Path(__file__).resolve().parents[1]
STOP_SECONDS = 5.0


def daemon_env(root: Path, url: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }
    env.update(
        FSWATCH_SYNC_ROOT=str(root),
        FSWATCH_SYNC_DATABASE_URL=url,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


class Daemon:
    def __init__(self, root: Path, url: str, log_path: Path) -> None:
        self.env = daemon_env(root, url)
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fswatch_sync", "run"],
            env=self.env,
            cwd=log_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path)


@pytest.fixture
def daemon(apps_root: Path, url: str, tmp_path: Path, probe: Engine) -> Iterator[Daemon]:
    started = Daemon(apps_root, url, tmp_path / "daemon.log")
    try:
        wait_until(
            lambda: started.process.poll() is not None or finished_sweeps(probe, "startup"),
            what="the daemon's start-up sweep",
        )
        assert started.process.poll() is None, started.output()
        yield started
    finally:
        started.close()


def live_instance(probe: Engine, daemon: Daemon) -> bool:
    return any(row["pid"] == daemon.process.pid for row in instance_rows(probe))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_cleanly_with_status_0(
    daemon: Daemon, probe: Engine, signum: int
) -> None:
    assert live_instance(probe, daemon)
    sent = time.monotonic()
    daemon.process.send_signal(signum)
    try:
        code = daemon.process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_SECONDS}s after {signal.Signals(signum).name}")
    assert code == 0, daemon.output()
    assert time.monotonic() - sent < STOP_SECONDS
    (row,) = instance_rows(probe)
    assert row["pid"] == daemon.process.pid
    assert row["state"] == "stopped"
    assert row["stopped_at"] is not None
    assert "Traceback" not in daemon.output()


def test_sighup_sweeps_now(daemon: Daemon, probe: Engine) -> None:
    assert finished_sweeps(probe, "signal") == []
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: finished_sweeps(probe, "signal"), what="the SIGHUP sweep")
    (sweep,) = finished_sweeps(probe, "signal")
    assert sweep["outcome"] == "ok"
    assert daemon.process.poll() is None, "SIGHUP must not stop the daemon"
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: len(finished_sweeps(probe, "signal")) == 2, what="a second SIGHUP sweep")


def test_status_json_from_another_process_shows_the_live_instance(
    daemon: Daemon, probe: Engine
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fswatch_sync", "status", "--json"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    (instance,) = [i for i in status["instances"] if i["pid"] == daemon.process.pid]
    assert instance["live"] is True
    assert instance["heartbeat_at"]
    assert instance["state"] == "watching"
    assert instance["stats"]["observer"] in ("native", "polling")
    assert [s["trigger"] for s in status["sweeps"]] == ["startup"]


def test_the_daemon_removes_a_deleted_app(apps_root: Path, url: str, tmp_path: Path) -> None:
    init_database(url)
    with probe_engine(url) as probe:
        keep = seed_app(probe, apps_root, AppKey(SLUG, 1))
        gone = seed_app(probe, apps_root, AppKey(SLUG, 2))
        daemon = Daemon(apps_root, url, tmp_path / "daemon.log")
        try:
            wait_until(lambda: finished_sweeps(probe, "startup"), what="the start-up sweep")
            shutil.rmtree(gone.path)
            wait_until(lambda: not has_row(probe, gone.key), what="the removal")
            assert_removed(probe, gone)
            assert has_row(probe, keep.key)
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=STOP_SECONDS) == 0
        finally:
            daemon.close()
