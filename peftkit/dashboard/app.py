"""`peftkit dashboard`: the page alone, without a model (runs and registry; no playground).

    serve_dashboard(Dashboard(runs=Path("runs"), registry=None, api_key=None, playground=False), port=8000)
"""
from __future__ import annotations

from fastapi import FastAPI

from peftkit.dashboard.routes import Dashboard, add_dashboard


def create_dashboard_app(dash: Dashboard) -> FastAPI:
    """Return a FastAPI app serving only the page and its JSON routes."""
    app = FastAPI(title="peftkit dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    add_dashboard(app, dash)
    return app


def serve_dashboard(dash: Dashboard, host: str = "127.0.0.1", port: int = 8000, allow_no_auth: bool = False,
                    open_browser: bool = False) -> None:
    """Serve the page in the foreground until interrupted (refusing to listen beyond loopback without a key)."""
    import threading
    import webbrowser

    from peftkit.serving.server import check_exposure, run_server

    check_exposure(host, dash.api_key, allow_no_auth)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"peftkit dashboard: {url}  (runs: {dash.runs}; Ctrl-C stops it)", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()  # once uvicorn is listening
    run_server(create_dashboard_app(dash), host, port)
