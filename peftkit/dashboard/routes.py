"""The page's HTTP side: the page at /, its static files, and the JSON it reads under /dashboard/api.

    add_dashboard(app, Dashboard(runs=Path("runs"), registry=None, api_key=key, playground=True))

The page and its static files are public (they hold no data); every /dashboard/api route needs the
API key when one is set, as the OpenAI routes do. The browser keeps the key for the tab only and sends
it as `Authorization: Bearer KEY`, so no cookie exists for another site to ride on; changes (tag,
untag, remove, verify) also need the header `X-Peftkit-Page: 1`, which a cross-site form cannot send.
The page builds its DOM with text nodes only, and the Content-Security-Policy below allows no inline
script, so a hostile run or adapter name is shown as text and never runs.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from peftkit.dashboard import adapters, runs
from peftkit.registry import DiskFullError, InvalidNameError, Registry, RegistryError, UnknownRefError

STATIC = Path(__file__).parent / "static"
STATIC_PREFIX = "/dashboard/static/"
PAGE_PATHS = ("/", "/favicon.ico")
"""Paths anyone may fetch: the page shell and its icon (the data behind it needs the key)."""
PAGE_HEADER = "X-Peftkit-Page"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                               "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass
class Dashboard:
    """Where the page reads from and what it offers."""

    runs: Path
    """Folder of training runs (each run's folder holds run.json)."""
    registry: str | None
    """Registry folder (None: $PEFTKIT_HOME/registry)."""
    api_key: str | None
    """Bearer key the JSON routes require (None: no key, loopback only)."""
    playground: bool
    """Whether a model is served here (the playground talks to /v1/chat/completions)."""


class DashboardError(Exception):
    """An error answered as {"error": {"message", "type", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def is_public(path: str) -> bool:
    """Return True for the page shell and its static files, which need no key."""
    return path in PAGE_PATHS or path.startswith(STATIC_PREFIX)


def add_dashboard(app: FastAPI, dash: Dashboard) -> None:
    """Add the page at /, its static files and its JSON routes to the app."""
    app.mount(STATIC_PREFIX.rstrip("/"), _Static(directory=STATIC), name="dashboard-static")

    @app.exception_handler(DashboardError)
    async def _error(request: Request, exc: DashboardError):
        return error_response(exc.status, str(exc), exc.code)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    def icon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml", headers=SECURITY_HEADERS)

    add_api_routes(app, dash)


def add_api_routes(app: FastAPI, dash: Dashboard) -> None:
    """Add /dashboard/api: info, runs, one run, the registry, one entry, and tag, untag, remove, verify."""
    key = Depends(key_check(dash.api_key))
    changes = [key, Depends(_from_page)]
    api = "/dashboard/api"

    @app.get(f"{api}/info", dependencies=[key])
    def info():
        from peftkit import __version__
        return {"version": __version__, "playground": dash.playground, "runs": str(dash.runs.resolve()),
                "registry": str(_registry_path(dash))}

    @app.get(f"{api}/runs", dependencies=[key])
    def list_runs():
        return _json({"runs": runs.list_runs(dash.runs), "root": str(dash.runs.resolve())})

    @app.get(api + "/runs/{run_id:path}", dependencies=[key])
    def one_run(run_id: str):
        try:
            return _json(runs.read_run(dash.runs, run_id))
        except runs.UnknownRunError as exc:
            raise DashboardError(404, str(exc), "run_not_found") from None

    @app.get(f"{api}/registry", dependencies=[key])
    def list_registry():
        return _json(_with_registry(dash, lambda reg: {"entries": adapters.list_entries(reg), "path": str(reg.path)}))

    @app.get(api + "/registry/{ref}", dependencies=[key])
    def one_entry(ref: str):
        return _json(_with_registry(dash, lambda reg: adapters.entry_detail(reg, ref)))

    @app.post(api + "/registry/{ref}/tag", dependencies=changes)
    def tag(ref: str, tag: str):
        return _json(_with_registry(dash, lambda reg: adapters.summary(reg.tag(ref, tag))))

    @app.post(api + "/registry/{ref}/untag", dependencies=changes)
    def untag(ref: str):
        return _json(_with_registry(dash, lambda reg: adapters.summary(reg.untag(ref))))

    @app.post(api + "/registry/{ref}/remove", dependencies=changes)
    def remove(ref: str):
        return _with_registry(dash, lambda reg: {"removed": reg.remove(ref)})

    @app.post(api + "/registry/{ref}/verify", dependencies=changes)
    def verify_one(ref: str):
        return _with_registry(dash, lambda reg: reg.verify(ref).to_dict())

    @app.post(f"{api}/verify", dependencies=changes)
    def verify_all():
        return _with_registry(dash, lambda reg: reg.verify().to_dict())


def key_check(api_key: str | None) -> Callable[..., None]:
    """Return the dependency that refuses a request without `Authorization: Bearer KEY` (nothing to check without a key)."""
    digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def require_key(authorization: str | None = Header(default=None)) -> None:
        if digest is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        # Digests of equal length: the comparison time says nothing about the key or its length.
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), digest):
            raise DashboardError(401, "Incorrect or missing API key; send it as 'Authorization: Bearer KEY'",
                                 "invalid_api_key")
    return require_key


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    """Return an error in the shape the OpenAI routes use, so the page reads every error the same way."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _from_page(x_peftkit_page: str | None = Header(default=None)) -> None:
    if x_peftkit_page != "1":
        raise DashboardError(403, f"changes need the header '{PAGE_HEADER}: 1', which the page sends", "missing_page_header")


def _registry_path(dash: Dashboard) -> Path:
    if dash.registry is not None:
        return Path(dash.registry).expanduser()
    from peftkit.registry import default_path
    return default_path()


def _with_registry(dash: Dashboard, action: Callable[[Registry], Any]) -> Any:
    """Return action(registry) on a Registry opened for this request (SQLite handles stay on one thread)."""
    try:
        with Registry(_registry_path(dash)) as reg:
            return action(reg)
    except UnknownRefError as exc:
        raise DashboardError(404, str(exc), "adapter_not_found") from None
    except InvalidNameError as exc:
        raise DashboardError(400, str(exc), "invalid_name") from None
    except DiskFullError as exc:
        raise DashboardError(507, str(exc), "disk_full") from None
    except RegistryError as exc:
        raise DashboardError(409, str(exc), "registry_refused") from None


def _json(value: Any) -> JSONResponse:
    return JSONResponse(runs.clean(value))


class _Static(StaticFiles):
    """StaticFiles with the page's security headers on every file."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response
