"""Issue 11, point 10: a PostgreSQL server that refuses the connection is a transient fault.

psycopg reports a refused (or dropped) connection as an OperationalError with no SQLSTATE. Taken
for a permanent error, it sent the reactor into its own backoff (up to 30 s) instead of the
store's quick retries, so recovery after a restart took tens of seconds instead of about one.
A server that refuses the log-in itself (no such database or role) stays a permanent error.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import SLUG, app_state, has_row, init_database, seed_app, stays_false, wait_until
from sqlalchemy.engine import Engine

from fswatch_sync import db
from fswatch_sync.hints import AppGone
from fswatch_sync.layout import AppKey
from fswatch_sync.reactor import Reactor
from fswatch_sync.stats import Stats
from fswatch_sync.store import Store


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _connect_error(url: str) -> sa.exc.DBAPIError:
    engine = db.create_engine(url)
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{url} accepted the connection")


@pytest.fixture
def postgres_url(tmp_path: Path, server_databases: dict[str, object]) -> str:
    from conftest import database_url_for

    return database_url_for("postgres", tmp_path, server_databases)  # type: ignore[arg-type]


def test_a_refused_postgres_connection_is_transient(postgres_url: str) -> None:
    refused = sa.make_url(postgres_url).set(port=_free_port())
    error = _connect_error(refused.render_as_string(hide_password=False))
    assert "refused" in str(error.orig).lower()
    assert db.is_transient(error)


@pytest.mark.parametrize("part", ["database", "username"])
def test_a_log_in_the_server_refuses_is_not_transient(postgres_url: str, part: str) -> None:
    url = sa.make_url(postgres_url)
    name = "fswatch_sync_no_such_name"
    wrong = url.set(database=name) if part == "database" else url.set(username=name)
    error = _connect_error(wrong.render_as_string(hide_password=False))
    assert "does not exist" in str(error.orig)
    assert not db.is_transient(error)


class _Forwarder:
    """A TCP port that refuses connections until :meth:`open`, then relays them to a server."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self._listener = listener
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            self._spawn(self._pipe, client, server)
            self._spawn(self._pipe, server, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=2)


@pytest.fixture
def forwarder(postgres_url: str) -> Iterator[_Forwarder]:
    url = sa.make_url(postgres_url)
    relay = _Forwarder(_free_port(), (url.host or "127.0.0.1", url.port or 5432))
    yield relay
    relay.close()


# How long the server refuses: long enough that the reactor's own doubling backoff, were the
# error taken for permanent, would next try more than RECOVERY_SECONDS after the server is back
# (it tries at 0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3 and then 12.7 s).
REFUSED_SECONDS = 7.0
RECOVERY_SECONDS = 4.0


def test_the_reactor_recovers_within_seconds_when_postgres_accepts_again(
    postgres_url: str, forwarder: _Forwarder, apps_root: Path
) -> None:
    init_database(postgres_url)
    through = sa.make_url(postgres_url).set(port=forwarder.port)
    engine: Engine = db.create_engine(through.render_as_string(hide_password=False))
    probe = sa.create_engine(postgres_url)
    gone = seed_app(probe, apps_root, AppKey(SLUG, 1))
    seed_app(probe, apps_root, AppKey(SLUG, 2))
    stop = threading.Event()
    reactor = Reactor(
        Store(engine), apps_root, sender="test", stats=Stats(),
        request_sweep=lambda _trigger: None, root_unusable=lambda _reason: None,
    )
    thread = threading.Thread(target=reactor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        shutil.rmtree(gone.path)
        reactor.submit(AppGone(gone.key))
        assert stays_false(lambda: not has_row(probe, gone.key), REFUSED_SECONDS)
        forwarder.open()
        back = time.monotonic()
        wait_until(lambda: not has_row(probe, gone.key), 30, "the removal after the outage")
        assert time.monotonic() - back < RECOVERY_SECONDS
    finally:
        stop.set()
        reactor.wake()
        thread.join(timeout=5)
        engine.dispose()
    assert app_state(probe, gone) == "removed"
    probe.dispose()
