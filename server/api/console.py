"""GET /admin/console: the operators' page (static HTML, CSS and scripts shipped in the package).

The page is public and holds no data: it asks for the admin token, keeps it in the tab's memory
only and reads the admin API with it. It loads nothing but its own files from this server,
which the Content-Security-Policy sent with every file enforces in the browser.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from server.api.errors import ApiError

router = APIRouter()

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
ASSETS = (  # every file the page loads, in its order; nothing else is served
    "console.css",
    "panels.css",
    "format.js",
    "svg.js",
    "charts.js",
    "bars.js",
    "panels.js",
    "tenants.js",
    "jobs.js",
    "console.js",
)
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    """Read at each request (a few KiB, once per page load): an upgrade shows at once."""
    content = files("server.api").joinpath("static", name).read_bytes()
    return Response(content, media_type=_TYPES[name[name.rindex(".") :]], headers=HEADERS)


@router.get("/admin/console", include_in_schema=False)
async def console() -> Response:
    """The page; it shows nothing until the operator gives the admin token."""
    return _file("console.html")


@router.get("/admin/console/{name}", include_in_schema=False)
async def console_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "no such console file", "not_found")
    return _file(name)
