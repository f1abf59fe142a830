"""The opt-in HTTP endpoint: ``/healthz``, ``/status``, ``/metrics`` and ``POST /sweep``.

Bound to loopback unless told otherwise; a bind beyond loopback is refused at start without a
token (see settings). ``POST /sweep`` needs ``Authorization: Bearer <FSWATCH_SYNC_HTTP_TOKEN>``,
compared in constant time; with no token configured it is refused outright.

Bounded so that no client can exhaust the daemon: every connection has READ_TIMEOUT_SECONDS to
send its request and REQUEST_TIMEOUT_SECONDS overall, at most MAX_CONNECTIONS are open at once,
and when a new client arrives at the cap the oldest connection that has not yet sent a whole
request is closed to make room (idle clients cannot keep ``/healthz`` from answering). Errors
are one log line each; clients never see exception text.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from fswatch_sync.errors import LeaseUnavailable, SettingsError, SweepRefused
from fswatch_sync.records import LeaseLost
from fswatch_sync.settings import Settings
from fswatch_sync.settingspecs import is_loopback, parse_bind
from fswatch_sync.stats import COUNTERS, SWEEP_DURATION_BUCKETS

if TYPE_CHECKING:
    from fswatch_sync.service import Service

log = logging.getLogger(__name__)

WATCH_STATES = ("starting", "watching", "root-missing", "root-empty", "stopped")

MAX_CONNECTIONS = 32
LISTEN_BACKLOG = 128
READ_TIMEOUT_SECONDS = 5.0
# /healthz turns 503 after this many sweeps in a row failed (not refused, not skipped): a daemon
# that can no longer maintain anything must not look healthy.
UNHEALTHY_AFTER_FAILED_SWEEPS = 3


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
            "fswatch_sync_waiting_rows",
            "App rows whose directories cannot be seen, kept until the tree proves absence.",
            value=stats.get("waiting_rows", 0),
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


def health(service: Service) -> tuple[bool, dict[str, Any]]:
    """Whether the service is healthy, and the JSON ``/healthz`` answers with."""
    stats = service.stats.snapshot()
    failed = int(stats.get("sweep_failures_in_a_row", 0))
    body: dict[str, Any] = {"ok": True, "watch_state": stats.get("watch_state"),
                            "sweep_failures_in_a_row": failed,
                            # rows whose directories cannot be seen, kept until the tree
                            # proves their absence (see treehealth)
                            "waiting_rows": service.status_stats()["waiting_rows"]}
    if not service.running:
        body.update(ok=False, reason="the service is not running")
    elif failed >= UNHEALTHY_AFTER_FAILED_SWEEPS:
        body.update(ok=False, reason=f"the last {failed} sweeps failed; see the service's log")
    return bool(body["ok"]), body


def _handler_for(service: Service, settings: Settings) -> type[BaseHTTPRequestHandler]:
    http_sweep = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "fswatch-sync"
        # One request per connection (HTTP/1.0): nothing is held open between requests.
        protocol_version = "HTTP/1.0"
        # Applied to the socket by StreamRequestHandler: a client that stops sending (or
        # reading) for this long is dropped.
        timeout = READ_TIMEOUT_SECONDS

        def log_message(self, format: str, *args: Any) -> None:
            # Never a query string: it may carry a secret (a token pasted into a URL).
            safe = tuple(a.split("?", 1)[0] if isinstance(a, str) else a for a in args)
            log.debug("http %s: %s", self.client_address[0], format % safe)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            path = self.path.split("?", 1)[0] if hasattr(self, "path") else "-"
            log.debug("http %s %s %s %s", self.client_address[0], self.command, path, code)

        def parse_request(self) -> bool:
            parsed = super().parse_request()
            if parsed:
                server = self.server
                if isinstance(server, BoundedHTTPServer):
                    server.mark_busy(self.connection)
            return parsed

        def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            if code == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="fswatch-sync"')
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, payload: Any) -> None:
            self._send(code, (json.dumps(payload, default=str) + "\n").encode())

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    healthy, body = health(service)
                    self._json(200 if healthy else 503, body)
                elif path == "/status":
                    self._json(200, service.status())
                elif path == "/metrics":
                    body_bytes, content_type = metrics_text(service)
                    self._send(200, body_bytes, content_type)
                else:
                    self._json(404, {"error": "not found"})
            except OSError:
                raise  # the client went away; handle_error logs it in one line
            except Exception as exc:
                log.error("http GET %s failed: %s", path, _first_line(exc))
                self._json(500, {"error": "internal error; see the service's log"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/sweep":
                self._json(404, {"error": "not found"})
                return
            if not token_matches(settings.http_token, self.headers.get("Authorization")):
                self._json(401, {"error": "a valid bearer token is required"})
                return
            # One sweep over HTTP at a time: requests piling up behind a long sweep would each
            # hold a connection slot until none were left for /healthz.
            if not http_sweep.acquire(blocking=False):
                self._json(409, {"error": "a sweep requested over http is already running"})
                return
            # Released before the answer goes out: a client that asks again as soon as it has
            # its answer must find the sweep finished.
            try:
                report = service.sweep_now(trigger="http")
                code, payload = 200, report.to_dict()
            except SweepRefused as exc:
                code, payload = 409, {"error": str(exc), "refused": True}
            except (LeaseUnavailable, LeaseLost) as exc:
                code, payload = 409, {"error": str(exc)}
            except Exception as exc:
                log.error("sweep requested over http failed: %s", _first_line(exc))
                code, payload = 500, {"error": "the sweep failed; see the service's log"}
            finally:
                http_sweep.release()
            self._json(code, payload)

    return Handler


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading server with a cap on open connections and one log line per error."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        # Open connections: socket -> (accepted at, whether a whole request was read).
        self._open: dict[socket.socket, tuple[float, bool]] = {}
        self._open_lock = threading.Lock()
        self.evicted = 0
        super().__init__(address, handler)

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    def mark_busy(self, connection: socket.socket) -> None:
        with self._open_lock:
            if connection in self._open:
                self._open[connection] = (self._open[connection][0], True)

    def process_request(self, request: Any, client_address: Any) -> None:
        victim: socket.socket | None = None
        with self._open_lock:
            if len(self._open) >= self.max_connections:
                idle = [(at, s) for s, (at, busy) in self._open.items() if not busy]
                if idle:
                    victim = min(idle, key=lambda item: item[0])[1]
                    del self._open[victim]
                    self.evicted += 1
            full = len(self._open) >= self.max_connections
            if not full:
                self._open[request] = (time.monotonic(), False)
        if victim is not None:
            # Wakes the thread blocked reading from it; that thread then closes it.
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)
        if full:  # every slot is serving a real request: this client tries again later
            log.warning("http: %d connections busy; refusing %s", self.max_connections,
                        client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("http %s: %s", client_address[0], _first_line(exc))
        else:
            log.warning("http %s: %s", client_address[0],
                        _first_line(exc) if exc else "unknown error")


class HttpServer:
    def __init__(self, server: BoundedHTTPServer, thread: threading.Thread) -> None:
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
    try:
        server = BoundedHTTPServer((host, port), _handler_for(service, settings))
    except OSError as exc:
        raise SettingsError(
            "http", f"cannot listen on {settings.http}: {exc.strerror or exc}"
        ) from None
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fswatch-sync-http",
        daemon=True,
    )
    thread.start()
    log.info("http endpoint on %s:%d", host, server.server_address[1])
    return HttpServer(server, thread)
