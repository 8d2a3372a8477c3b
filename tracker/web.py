"""The map page (``/``), the embed page (``/embed``) and the browser files (``/web/...``).

The pages are static: ``web/map.js`` reads ``/web/config.json`` (tiles, index resolution,
feed limits, where to start) and opens feeds itself, passing on any ``token`` from the
page's URL. Files come from the repository's ``web/`` directory, or from
``<prefix>/share/tracker/web`` where a wheel installs them (``web_dir`` to serve another
copy), with JavaScript served as such: browsers refuse ES modules otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from quart import Response, send_from_directory
from quart_trio import QuartTrio

from tracker.config import TrackerConfig

__all__ = ["WEB_DIR", "add_web_routes"]

_SOURCE_WEB = Path(__file__).resolve().parent.parent / "web"
WEB_DIR = _SOURCE_WEB if _SOURCE_WEB.is_dir() else Path(sys.prefix) / "share" / "tracker" / "web"
"""``web/`` of the source tree (an editable install), else where a wheel installed it."""

_MIME = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}


def add_web_routes(app: QuartTrio, config: TrackerConfig) -> None:
    """Serve the pages and files of ``web/`` on ``app``."""
    root = Path(config.web_dir) if config.web_dir else WEB_DIR
    page_config = {
        "tile_url": config.tile_url,
        "tile_attribution": config.tile_attribution,
        "h3_resolution": config.h3_resolution,
        "max_feed_cells": config.max_feed_cells,
        "map_center": list(config.map_center_latlon),
        "map_zoom": config.map_zoom,
    }

    async def page(name: str) -> Response:
        response = await send_from_directory(root, name)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/")
    async def map_page() -> Response:
        return await page("index.html")

    @app.get("/embed")
    async def embed_page() -> Response:
        return await page("embed.html")

    @app.get("/web/config.json")
    async def web_config() -> dict[str, object]:
        return page_config

    @app.get("/web/<path:name>")
    async def web_file(name: str) -> Response:
        response = await send_from_directory(root, name)
        mime = _MIME.get(Path(name).suffix)
        if mime:
            response.mimetype = mime
        return response
