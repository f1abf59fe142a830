"""``fswatch-sync run``: the service in the foreground, driven by POSIX signals.

SIGTERM and SIGINT stop it cleanly (exit status 0, well within 5 s); SIGHUP asks for a sweep now.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from fswatch_sync.service import Service
from fswatch_sync.settings import Settings

log = logging.getLogger(__name__)


def run_daemon(settings: Settings) -> int:
    service = Service(settings)
    stop = threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        log.info("received SIGHUP; sweeping now")
        service.request_sweep("signal")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    server = None
    if settings.http:
        from fswatch_sync.http import serve

        # Bound before the service starts: a busy port is reported at once, before the
        # start-up sweep has changed anything (/healthz answers 503 until the service runs).
        server = serve(service, settings)
    try:
        service.start()
    except BaseException:
        if server is not None:
            server.shutdown()
        raise
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        if server is not None:
            server.shutdown()
        service.stop()
    return 0
