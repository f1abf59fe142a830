"""The HTTP endpoint under clients that misbehave, through real sockets: idle connections, a
flood of them, requests that fail, secrets in query strings; and /healthz after failed sweeps."""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import APPS, add_app_row, has_row, probe_engine, wait_until

from fswatch_sync import db
from fswatch_sync import http as endpoint_module
from fswatch_sync.http import MAX_CONNECTIONS, UNHEALTHY_AFTER_FAILED_SWEEPS, HttpServer, serve
from fswatch_sync.layout import AppKey
from fswatch_sync.service import Service
from fswatch_sync.settings import load_settings
from fswatch_sync.store import Store
from fswatch_sync.sweep_report import SweepReport

SLUG = "model"
TOKEN = "token-in-a-query-string"


@dataclass
class Running:
    service: Service
    server: HttpServer
    url: str
    root: Path

    def get(self, path: str, timeout: float = 10) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode()


@pytest.fixture
def running(tmp_path: Path, apps_root: Path) -> Iterator[Running]:
    url = f"sqlite:///{tmp_path / 'http.db'}"
    engine = db.create_engine(url)
    Store(engine).init_db()
    engine.dispose()
    with probe_engine(url) as probe:
        for number in (1, 2):
            (apps_root / SLUG / f"app{number}").mkdir(parents=True)
            add_app_row(probe, AppKey(SLUG, number), db.utcnow() - timedelta(days=1))
    settings = load_settings(
        {"root": str(apps_root), "database_url": url, "http": "127.0.0.1:0",
         "interval_seconds": "3600", "settle_ms": "0", "lease_seconds": "2",
         "http_token": TOKEN},
        environ={},
    )
    service = Service(settings, initial_sweep=False)
    service.start()
    server = serve(service, settings)
    try:
        yield Running(service, server, url, apps_root)
    finally:
        server.shutdown()
        service.stop()


def idle_clients(port: int, count: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        clients.append(client)
    return clients


def test_idle_clients_exhaust_nothing(running: Running) -> None:
    threads_before = threading.active_count()
    clients = idle_clients(running.server.port, 200)
    try:
        # Every client accepted: the oldest idle ones were closed to make room for the newer.
        wait_until(lambda: running.server.server.evicted >= 200 - MAX_CONNECTIONS,
                   what="every client accepted")
        assert running.server.server.open_connections <= MAX_CONNECTIONS
        # The threads of the evicted connections end; what stays is bounded by the cap.
        wait_until(lambda: threading.active_count() <= threads_before + MAX_CONNECTIONS,
                   what="the threads bounded by the cap",
                   on_timeout=lambda: f"{threading.active_count()} threads")
        # /healthz still answers, at once.
        status, body = running.get("/healthz", timeout=5)
        assert (status, body["ok"]) == (200, True)
        # And the reactor still acts on a removal promptly.
        shutil.rmtree(running.root / SLUG / "app1")
        with probe_engine(running.url) as probe:
            wait_until(lambda: not has_row(probe, AppKey(SLUG, 1)), 10, "the removal")
    finally:
        for client in clients:
            client.close()


def test_a_silent_client_is_dropped_after_the_read_timeout(
    monkeypatch: pytest.MonkeyPatch, running: Running
) -> None:
    monkeypatch.setattr(endpoint_module, "READ_TIMEOUT_SECONDS", 0.3)
    server = serve(running.service, running.service.settings)
    try:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with client:
            # The server closes the connection: recv returns end-of-file, well before 10 s.
            assert client.recv(1024) == b""
            wait_until(lambda: server.server.open_connections == 0, 5, "the idle client dropped")
    finally:
        server.shutdown()


def test_the_listen_backlog_is_not_five(running: Running) -> None:
    assert running.server.server.request_queue_size >= 64


def test_errors_are_one_log_line_and_never_shown_to_clients(
    monkeypatch: pytest.MonkeyPatch, running: Running, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    def broken_status() -> dict[str, Any]:
        raise RuntimeError("internal detail: /secret/path\nsecond line")

    monkeypatch.setattr(running.service, "status", broken_status)
    with caplog.at_level(logging.DEBUG, logger="fswatch_sync"):
        status, body = running.get("/status")
        assert status == 500
        assert "internal detail" not in json.dumps(body)
        failed = [r for r in caplog.records if "internal detail" in r.getMessage()]
        assert len(failed) == 1 and "\n" not in failed[0].getMessage()

        # A failure that escapes the handler (the client gone mid-answer): still one line,
        # never socketserver's traceback on stderr.
        def gone(_service: Service) -> tuple[bytes, str]:
            raise ConnectionResetError("peer went away")

        monkeypatch.setattr(endpoint_module, "metrics_text", gone)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            running.get("/metrics")
        wait_until(lambda: any("peer went away" in r.getMessage() for r in caplog.records),
                   5, "the error logged")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred during processing" not in err


def test_a_failed_http_sweep_shows_no_exception_text(
    monkeypatch: pytest.MonkeyPatch, running: Running
) -> None:
    def broken(**_kwargs: Any) -> None:
        raise RuntimeError("password=hunter2 at db:5432")

    monkeypatch.setattr(running.service, "sweep_now", broken)
    connection = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=10)
    connection.request("POST", "/sweep", headers={"Authorization": f"Bearer {TOKEN}"})
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    assert response.status == 500
    assert "hunter2" not in body


def test_a_token_in_the_query_string_is_never_logged(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="fswatch_sync"):
        running.get(f"/status?token={TOKEN}")
        running.get(f"/nowhere?token={TOKEN}")
        connection = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=10)
        connection.request("POST", f"/sweep?token={TOKEN}")
        connection.getresponse().read()
        connection.close()
        # A request line the server cannot parse is logged too: without its query either.
        with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as raw:
            raw.sendall(f"GET /x?token={TOKEN} HTTP/9.9 extra\r\n\r\n".encode())
            raw.recv(4096)
        wait_until(lambda: len([r for r in caplog.records if "http" in r.getMessage()]) >= 4,
                   5, "the requests logged")
    assert TOKEN not in caplog.text
    assert "/status" in caplog.text


def test_healthz_turns_unhealthy_after_repeated_sweep_failures(running: Running) -> None:
    assert running.get("/healthz")[0] == 200
    with probe_engine(running.url) as probe:
        with probe.begin() as connection:
            connection.execute(sa.text(f"ALTER TABLE {APPS.name} RENAME TO broken_apps"))
        running.service.request_sweep("manual")
        wait_until(lambda: running.get("/healthz")[0] == 503, 30, "/healthz unhealthy")
        status, body = running.get("/healthz")
        assert (status, body["ok"]) == (503, False)
        assert body["sweep_failures_in_a_row"] >= UNHEALTHY_AFTER_FAILED_SWEEPS
        assert "sweeps failed" in body["reason"]
        # The sweep is retried by itself; once it succeeds the instance is healthy again.
        with probe.begin() as connection:
            connection.execute(sa.text(f"ALTER TABLE broken_apps RENAME TO {APPS.name}"))
        wait_until(lambda: running.get("/healthz")[0] == 200, 30, "/healthz healthy again")


def test_one_http_sweep_at_a_time(monkeypatch: pytest.MonkeyPatch, running: Running) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_sweep(**_kwargs: Any) -> SweepReport:
        entered.set()
        assert release.wait(20)
        return SweepReport()

    monkeypatch.setattr(running.service, "sweep_now", slow_sweep)

    def post() -> int:
        connection = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=30)
        try:
            connection.request("POST", "/sweep", headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    first: list[int] = []
    worker = threading.Thread(target=lambda: first.append(post()))
    worker.start()
    try:
        assert entered.wait(10)
        # Others are answered at once instead of queueing behind the running sweep.
        assert [post() for _ in range(5)] == [409] * 5
        assert running.get("/healthz", timeout=5)[0] == 200
    finally:
        release.set()
        worker.join(timeout=20)
    assert first == [200]
