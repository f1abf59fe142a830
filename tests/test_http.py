"""The opt-in HTTP endpoint, served on a free loopback port by a running service."""

from __future__ import annotations

import http.client
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families

from fswatch_sync import cli, db
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.errors import SettingsError
from fswatch_sync.http import HttpServer, serve, token_matches
from fswatch_sync.layout import AppKey
from fswatch_sync.records import Lease
from fswatch_sync.schema import sweeps_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.service import Service
from fswatch_sync.settings import Settings, load_settings
from fswatch_sync.store import Store

HOST = default_host_metadata(SchemaConfig())
APPS = HOST.tables["generated_applications"]
TASKS = HOST.tables["analysis_tasks"]
SLUG = "openai_gpt-4"
TOKEN = "s3cret-token-for-tests"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Endpoint:
    service: Service
    server: HttpServer
    engine: sa.Engine
    root: Path

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                         response.read())
        finally:
            connection.close()

    def sweep_rows(self) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(sa.select(sweeps_table)).all())

    def app_keys(self) -> set[AppKey]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(APPS.c.model_slug, APPS.c.app_number)).all()
        return {AppKey(slug, number) for slug, number in rows}

    def metrics(self) -> dict[str, float]:
        reply = self.request("GET", "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(reply.body.decode()):
            for sample in family.samples:
                label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{label}}}" if label else sample.name] = sample.value
        return values


def start_endpoint(tmp_path: Path, root: Path, **flags: Any) -> Endpoint:
    """Two present apps (app1 with an active task) and one old orphan row, then serve."""
    url = f"sqlite:///{tmp_path / 'http.db'}"
    engine = db.create_engine(url)
    Store(engine).init_db()
    now = db.utcnow()
    old = db.to_db_time(now - timedelta(days=1))
    for number in (1, 2):
        (root / SLUG / f"app{number}").mkdir(parents=True, exist_ok=True)
    with engine.begin() as connection:
        connection.execute(sa.insert(APPS), [
            {"model_slug": SLUG, "app_number": 1, "created_at": db.to_db_time(now)},
            {"model_slug": SLUG, "app_number": 2, "created_at": db.to_db_time(now)},
            {"model_slug": "gone", "app_number": 9, "created_at": old},
        ])
        connection.execute(sa.insert(TASKS), [
            {"task_id": "t1", "target_model": SLUG, "target_app_number": 1,
             "status": "pending", "created_at": db.to_db_time(now)},
        ])
    settings = load_settings(
        {"root": str(root), "database_url": url, "http": "127.0.0.1:0",
         "interval_seconds": "3600", "settle_ms": "0", **flags},
        environ={},
    )
    service = Service(settings, initial_sweep=False)
    service.start()
    try:
        server = serve(service, settings)
    except BaseException:
        service.stop()
        raise
    return Endpoint(service, server, engine, root)


@pytest.fixture
def endpoint(tmp_path: Path, apps_root: Path) -> Iterator[Endpoint]:
    started = start_endpoint(tmp_path, apps_root, http_token=TOKEN)
    yield started
    started.server.shutdown()
    started.service.stop()
    started.engine.dispose()


def test_sweep_needs_the_right_token(endpoint: Endpoint) -> None:
    refused = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
    ]
    for headers in refused:
        reply = endpoint.request("POST", "/sweep", headers)
        assert reply.status == 401, headers
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert "error" in reply.json()
    assert endpoint.sweep_rows() == []
    assert AppKey("gone", 9) in endpoint.app_keys()

    reply = endpoint.request("POST", "/sweep", {"Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 200, reply.body
    report = reply.json()
    assert report["orphan_apps"] == 1
    assert report["dry_run"] is False
    rows = endpoint.sweep_rows()
    assert [(row.trigger, row.outcome, row.orphan_apps) for row in rows] == [("http", "ok", 1)]
    assert endpoint.app_keys() == {AppKey(SLUG, 1), AppKey(SLUG, 2)}

    # The scheme is case-insensitive; the token is not.
    assert endpoint.request("POST", "/sweep", {"Authorization": f"bearer {TOKEN}"}).status == 200
    assert endpoint.request(
        "POST", "/sweep", {"Authorization": f"Bearer {TOKEN.upper()}"}
    ).status == 401
    assert len(endpoint.sweep_rows()) == 2

    # While another instance holds the lease, the sweep is refused with 409 and not run.
    other = Lease(endpoint.engine, "another-instance", duration_seconds=30)
    assert other.try_acquire()
    reply = endpoint.request("POST", "/sweep", {"Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 409
    assert len(endpoint.sweep_rows()) == 2


def test_without_a_token_sweep_is_refused(tmp_path: Path, apps_root: Path) -> None:
    started = start_endpoint(tmp_path, apps_root)
    try:
        assert started.service.settings.http_token == ""
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
            assert started.request("POST", "/sweep", headers).status == 401
        assert started.sweep_rows() == []
        assert AppKey("gone", 9) in started.app_keys()
        assert started.request("GET", "/healthz").status == 200
    finally:
        started.server.shutdown()
        started.service.stop()
        started.engine.dispose()


def test_token_matches() -> None:
    assert token_matches("abc", "Bearer abc")
    assert token_matches("abc", "BEARER  abc ")
    assert not token_matches("", "Bearer ")
    assert not token_matches("", None)
    assert not token_matches("abc", None)
    assert not token_matches("abc", "Bearerabc")
    assert not token_matches("abc", "Bearer abd")


def test_healthz_status_and_unknown_paths(endpoint: Endpoint) -> None:
    health = endpoint.request("GET", "/healthz")
    assert health.status == 200
    assert health.json() == {
        "ok": True, "watch_state": "watching", "sweep_failures_in_a_row": 0, "waiting_rows": 0
    }

    status = endpoint.request("GET", "/status")
    assert status.status == 200
    assert status.headers["content-type"] == "application/json"
    body = status.json()
    assert body["instance_id"] == endpoint.service.instance_id
    assert body["running"] is True
    assert body["root"] == str(endpoint.root)
    assert body["settings"]["http_token"] == "***"
    assert TOKEN.encode() not in status.body
    assert body["stats"]["watch_state"] == "watching"

    assert endpoint.request("GET", "/nothing-here").status == 404
    assert endpoint.request("POST", "/status").status == 404
    assert endpoint.request("GET", "/sweep").status == 404

    endpoint.service.stop()
    stopped = endpoint.request("GET", "/healthz")
    assert stopped.status == 503
    assert stopped.json()["ok"] is False


def test_metrics_parse_and_move_after_a_removal(endpoint: Endpoint) -> None:
    before = endpoint.metrics()
    for name in ("apps_removed", "tasks_cancelled", "tasks_failed", "tasks_purged",
                 "events_handled", "sweeps", "sweeps_refused", "errors"):
        assert f"fswatch_sync_{name}_total" in before, name
    assert before["fswatch_sync_apps_removed_total"] == 0
    assert before["fswatch_sync_tasks_cancelled_total"] == 0
    assert before["fswatch_sync_sweep_duration_seconds_count"] == 0
    assert before["fswatch_sync_watch_state{state=watching}"] == 1
    assert before["fswatch_sync_watch_state{state=root-missing}"] == 0
    assert before["fswatch_sync_queue_depth"] == 0
    assert before["fswatch_sync_last_sweep_timestamp_seconds"] == 0

    shutil.rmtree(endpoint.root / SLUG / "app1")
    wait_until(
        lambda: endpoint.metrics()["fswatch_sync_apps_removed_total"] == 1,
        what="apps_removed to count the removal",
    )
    after = endpoint.metrics()
    assert after["fswatch_sync_tasks_cancelled_total"] == 1
    assert after["fswatch_sync_events_handled_total"] >= 1
    assert AppKey(SLUG, 1) not in endpoint.app_keys()

    # A sweep moves the sweep counters and the duration histogram.
    started = time.time()
    reply = endpoint.request("POST", "/sweep", {"Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 200
    swept = endpoint.metrics()
    assert swept["fswatch_sync_sweeps_total"] == 1
    assert swept["fswatch_sync_apps_removed_total"] == 2  # the orphan row
    assert swept["fswatch_sync_sweep_duration_seconds_count"] == 1
    assert swept["fswatch_sync_sweep_duration_seconds_bucket{le=+Inf}"] == 1
    assert swept["fswatch_sync_last_sweep_timestamp_seconds"] >= started


def test_a_bind_beyond_loopback_needs_a_token(tmp_path: Path, apps_root: Path) -> None:
    base = {"root": str(apps_root), "database_url": f"sqlite:///{tmp_path / 'x.db'}"}
    for bind in ("0.0.0.0:8080", "[::]:8080", "192.0.2.1:9000", "example.org:80"):
        with pytest.raises(SettingsError, match="http") as caught:
            load_settings({**base, "http": bind}, environ={})
        assert "TOKEN" in str(caught.value)
        with pytest.raises(SettingsError, match="http"):
            load_settings(base, environ={"FSWATCH_SYNC_HTTP": bind})
        allowed = load_settings(base, environ={"FSWATCH_SYNC_HTTP": bind,
                                               "FSWATCH_SYNC_HTTP_TOKEN": TOKEN})
        assert allowed.http == bind
    for bind in ("127.0.0.1:0", "localhost:8080", "[::1]:0", "127.0.0.2:9"):
        assert load_settings({**base, "http": bind}, environ={}).http == bind
    for bad in ("8080", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:-1", ":80"):
        with pytest.raises(SettingsError, match="http"):
            load_settings({**base, "http": bad}, environ={})

    # Settings built by hand meet the same rule when served.
    service = Service(load_settings(base, environ={}))
    with pytest.raises(SettingsError, match="loopback"):
        serve(service, replace(service.settings, http="0.0.0.0:0"))
    service.store.engine.dispose()

    # The daemon refuses at start, with the settings exit status, before serving anything.
    assert cli.main(["run", "--root", base["root"], "--database-url", base["database_url"],
                     "--http", "0.0.0.0:0"]) == 2


def test_serve_on_port_zero_picks_a_free_port(endpoint: Endpoint) -> None:
    assert endpoint.service.settings.http == "127.0.0.1:0"
    assert endpoint.server.port > 0
    assert isinstance(endpoint.service.settings, Settings)
