"""The opt-in HTTP endpoint: ``/healthz``, ``/status``, ``/metrics`` and ``POST /sweep``.

Bound to loopback unless told otherwise; a bind beyond loopback is refused at start without a
token (see settings). ``POST /sweep`` needs ``Authorization: Bearer <FSWATCH_SYNC_HTTP_TOKEN>``,
compared in constant time; with no token configured it is refused outright.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from fswatch_sync.errors import LeaseUnavailable, SettingsError, SweepRefused
from fswatch_sync.records import LeaseLost
from fswatch_sync.settings import Settings, is_loopback, parse_bind
from fswatch_sync.stats import COUNTERS, SWEEP_DURATION_BUCKETS

if TYPE_CHECKING:
    from fswatch_sync.service import Service

log = logging.getLogger(__name__)

WATCH_STATES = ("starting", "watching", "root-missing", "root-empty", "stopped")


class ServiceCollector:
    """Reads the service's counters at scrape time (no second copy of the numbers)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stats = self.service.status_stats()
        for name, text in COUNTERS.items():
            yield CounterMetricFamily(f"fswatch_sync_{name}", text, value=stats.get(name, 0))
        yield GaugeMetricFamily(
            "fswatch_sync_queue_depth", "Removals waiting for the reactor.",
            value=stats["queue_depth"],
        )
        yield GaugeMetricFamily(
            "fswatch_sync_apps_marked_missing",
            "App keys marked missing, waiting out the missing-since grace.",
            value=stats.get("apps_marked_missing", 0),
        )
        yield GaugeMetricFamily(
            "fswatch_sync_watches", "Directories watched.", value=stats["watches"]
        )
        yield GaugeMetricFamily(
            "fswatch_sync_last_sweep_timestamp_seconds",
            "Unix time the last sweep of this instance finished (0: none yet).",
            value=stats.get("last_sweep_timestamp", 0.0),
        )
        state = GaugeMetricFamily(
            "fswatch_sync_watch_state", "1 for the watcher's current state.", labels=["state"]
        )
        for name in WATCH_STATES:
            state.add_metric([name], 1.0 if stats["watch_state"] == name else 0.0)
        yield state
        buckets, total = stats["sweep_duration_buckets"], stats["sweep_duration_sum"]
        cumulative = []
        running = 0
        for bound, count in zip(SWEEP_DURATION_BUCKETS, buckets, strict=False):
            running += count
            cumulative.append((repr(float(bound)), running))
        running += buckets[-1]
        cumulative.append(("+Inf", running))
        yield HistogramMetricFamily(
            "fswatch_sync_sweep_duration_seconds", "How long sweeps took.",
            buckets=cumulative, sum_value=total,
        )


def metrics_text(service: Service) -> tuple[bytes, str]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def token_matches(expected: str, header: str | None) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries the expected token (never when none is
    configured). The scheme is case-insensitive (RFC 9110); the token is compared in constant
    time."""
    if not expected or not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def _handler_for(service: Service, settings: Settings) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fswatch-sync"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s %s", self.address_string(), format % args)

        def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            if code == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="fswatch-sync"')
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, payload: Any) -> None:
            self._send(code, (json.dumps(payload, default=str) + "\n").encode())

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                healthy = service.running
                state = service.stats.get("watch_state")
                self._json(200 if healthy else 503, {"ok": healthy, "watch_state": state})
            elif path == "/status":
                self._json(200, service.status())
            elif path == "/metrics":
                body, content_type = metrics_text(service)
                self._send(200, body, content_type)
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/sweep":
                self._json(404, {"error": "not found"})
                return
            if not token_matches(settings.http_token, self.headers.get("Authorization")):
                self._json(401, {"error": "a valid bearer token is required"})
                return
            try:
                report = service.sweep_now(trigger="http")
            except SweepRefused as exc:
                self._json(409, {"error": str(exc), "refused": True})
            except (LeaseUnavailable, LeaseLost) as exc:
                self._json(409, {"error": str(exc)})
            except Exception as exc:
                log.exception("sweep requested over http failed")
                self._json(500, {"error": str(exc).splitlines()[0] if str(exc) else
                                 type(exc).__name__})
            else:
                self._json(200, report.to_dict())

    return Handler


class HttpServer:
    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2)


def serve(service: Service, settings: Settings) -> HttpServer:
    """Start the endpoint in a daemon thread."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise SettingsError(
            "http", "needs prometheus_client: pip install 'fswatch_sync[http]'"
        ) from None
    host, port = parse_bind("http", settings.http)
    if not is_loopback(host) and not settings.http_token:
        # load_settings refuses this already; a Settings built by hand meets the same rule.
        raise SettingsError(
            "http", f"binding {host!r} beyond loopback needs FSWATCH_SYNC_HTTP_TOKEN"
        )
    server = ThreadingHTTPServer((host, port), _handler_for(service, settings))
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fswatch-sync-http",
        daemon=True,
    )
    thread.start()
    log.info("http endpoint on %s:%d", host, server.server_address[1])
    return HttpServer(server, thread)
