"""Running the app under uvicorn: in the foreground for `peftkit serve`, or on a background thread for tests and benches."""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass

from peftkit.serving.errors import ServingError
from peftkit.serving.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class BackgroundServer:
    """A uvicorn server running on a thread; `url` is its base URL (http://127.0.0.1:PORT)."""

    server: object
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def is_loopback(host: str) -> bool:
    """Return True for an address of this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, allow_no_auth: bool = False) -> None:
    """Raise ServingError when asked to listen beyond loopback without an API key."""
    if not (api_key or allow_no_auth or is_loopback(host)):
        raise ServingError(f"refusing to listen on {host} without an API key: anyone who can reach it could use the "
                           "server. Pass --api-key KEY (or set PEFTKIT_API_KEY), or --insecure-no-auth to accept this")


def run_server(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the app in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=5)


def start_background(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> BackgroundServer:
    """Return a running BackgroundServer for the app (port 0 picks a free port)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="peftkit-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServingError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return BackgroundServer(server, thread, f"http://{bound[0]}:{bound[1]}")


def serve(settings: ServeSettings) -> None:
    """Serve the base model and the registry's adapters over HTTP until interrupted (the model loads in the background)."""
    from peftkit.serving.app import create_app
    from peftkit.serving.engine import Engine

    check_exposure(settings.host, settings.api_key, settings.insecure_no_auth)
    engine = Engine(settings)
    engine.start(wait=False)  # /health answers at once; /ready turns 200 when the model is loaded
    try:
        run_server(create_app(engine, settings), settings.host, settings.port)
    finally:
        engine.stop()
