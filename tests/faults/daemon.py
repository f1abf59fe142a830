"""``fswatch-sync run`` as a child process: start, wait until it has swept, signal, kill -9.

Readiness is read from the database (the instance's heartbeat row, then its start-up sweep's
row), never guessed with a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from helpers import wait_until
from sqlalchemy.engine import Engine

from fswatch_sync.schema import instances_table, sweeps_table

CHECKOUT = Path(__file__).resolve().parents[2]
READY_SECONDS = 30.0
STOP_SECONDS = 5.0


class DaemonDied(AssertionError):
    """The daemon exited when it should have been running."""


def clean_environment() -> dict[str, str]:
    """This process's environment without any setting the daemon would read."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("FSWATCH_SYNC_", "MAINTENANCE_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [str(CHECKOUT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60.0) -> str:
    """``python -m fswatch_sync ARGS``; its stdout, or AssertionError with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "fswatch_sync", *args],
        env=env, cwd=CHECKOUT, capture_output=True, text=True, timeout=timeout, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"fswatch-sync {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-800:]}"
        )
    return done.stdout


def init_db(url: str) -> None:
    """``fswatch-sync init-db``, in this process (a child would spend a second importing)."""
    from fswatch_sync import db
    from fswatch_sync.store import Store

    engine = db.create_engine(url)
    try:
        Store(engine).init_db()
    finally:
        engine.dispose()


class Daemon:
    """One ``python -m fswatch_sync run`` child at a time, with its settings in the environment."""

    def __init__(self, workdir: Path, settings: dict[str, str], *, name: str = "daemon") -> None:
        self.workdir = workdir
        self.settings = dict(settings)
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.instance_id: str | None = None
        self.log_path = workdir / f"{name}-0.log"
        self._log: IO[bytes] | None = None

    def env(self, **overrides: str) -> dict[str, str]:
        env = clean_environment()
        env.update(self.settings)
        env.update(overrides)
        return env

    @property
    def pid(self) -> int:
        assert self.process is not None, "the daemon is not started"
        return self.process.pid

    def start(self, **overrides: str) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        self.log_path = self.workdir / f"{self.name}-{self.starts}.log"
        self._log = self.log_path.open("wb")
        self.instance_id = None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fswatch_sync", "run"],
            env=self.env(**overrides), cwd=CHECKOUT, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, seconds: float) -> bool:
        """Let ``seconds`` pass while watching the daemon: True as soon as it has exited.

        This is how the scenarios pace their bursts and place their kill points: the time
        passes on the daemon, so one that dies on its own is seen at once, not after the pause.
        """
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=max(seconds, 0.0))
        except subprocess.TimeoutExpired:
            return False
        return True

    def _check_alive(self) -> None:
        if not self.alive():
            code = self.process.returncode if self.process else None
            raise DaemonDied(f"{self.name} exited with status {code}: {self.log_tail()}")

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " / ".join(text.strip().splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def find_instance(self, engine: Engine) -> str | None:
        """This child's instance id, from its heartbeat row (hostname and pid)."""
        table = instances_table
        try:
            with engine.connect() as connection:
                row = connection.execute(
                    sa.select(table.c.instance_id)
                    .where(table.c.pid == self.pid, table.c.hostname == socket.gethostname()[:255])
                    .order_by(table.c.started_at.desc())
                    .limit(1)
                ).first()
        except sa.exc.DBAPIError:  # tables not there yet, or a connection killed by a scenario
            return None
        return None if row is None else str(row[0])

    def sweeps(self, engine: Engine, trigger: str | None = None) -> list[dict[str, Any]]:
        """This instance's sweep rows (all of them, finished or not)."""
        if self.instance_id is None:
            return []
        table = sweeps_table
        query = sa.select(table).where(table.c.instance_id == self.instance_id)
        if trigger is not None:
            query = query.where(table.c.trigger == trigger)
        try:
            with engine.connect() as connection:
                rows = connection.execute(query.order_by(table.c.id)).all()
        except sa.exc.DBAPIError:
            return []
        return [dict(row._mapping) for row in rows]

    def wait_ready(self, engine: Engine, timeout: float = READY_SECONDS) -> dict[str, Any]:
        """Until the start-up sweep has finished; returns its row. Fails if it did not succeed."""

        def instance_known() -> bool:
            self._check_alive()
            self.instance_id = self.find_instance(engine)
            return self.instance_id is not None

        wait_until(instance_known, timeout, f"{self.name} to record itself",
                   on_timeout=self.log_tail)
        finished: list[dict[str, Any]] = []

        def swept() -> bool:
            self._check_alive()
            finished[:] = [r for r in self.sweeps(engine, "startup") if r["finished_at"]]
            return bool(finished)

        wait_until(swept, timeout, f"{self.name}'s start-up sweep to finish",
                   on_timeout=self.log_tail)
        row = finished[-1]
        if row["outcome"] != "ok":
            raise AssertionError(
                f"{self.name}'s start-up sweep ended {row['outcome']}: {row['message']}"
            )
        return row

    def hup(self) -> None:
        self._check_alive()
        os.kill(self.pid, signal.SIGHUP)

    def kill9(self) -> int:
        """SIGKILL now; returns the exit status (-9, or the status it had already died with)."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        code = self.process.wait(timeout=10)
        self._close_log()
        return code

    def stop(self) -> int:
        """SIGTERM, as an operator would; the exit status (a clean stop is 0 within 5 s)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=STOP_SECONDS + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                raise AssertionError(f"{self.name} did not stop on SIGTERM") from None
        else:
            code = self.process.returncode
        self._close_log()
        return code

    def rss_kib(self) -> int:
        """The child's resident set size now, from /proc."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Make sure nothing is left running (used in ``finally``)."""
        if self.alive():
            self.kill9()
        self._close_log()
