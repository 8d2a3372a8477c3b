"""The map page (``/``), the embed page (``/embed``) and the browser files (``/web/...``).

The pages are static: ``web/map.js`` reads ``/web/config.json`` (tiles, streets, index
resolution, feed limits, where to start) and opens feeds itself, passing on any ``token``
from the page's URL. Files come from the repository's ``web/`` directory, or from
``<prefix>/share/tracker/web`` where a wheel installs them (``web_dir`` to serve another
copy), with JavaScript served as such: browsers refuse ES modules otherwise. Pages of the
origins in ``cors_origins`` may import the modules (``headers.py``).

``streets_file`` (GeoJSON) is served as ``/web/streets.geojson``: read and checked once
at startup (:func:`load_streets`, bounded by ``STREETS_MAX_BYTES``), gzipped once, and
revalidated by browsers with its ETag.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path
from typing import NamedTuple

import msgspec
from quart import Response, request, send_from_directory
from quart_trio import QuartTrio

from tracker.config import MIB, ConfigError, TrackerConfig, env_name, flag

__all__ = ["STREETS_PATH", "WEB_DIR", "Streets", "add_web_routes", "load_streets"]

_SOURCE_WEB = Path(__file__).resolve().parent.parent / "web"
WEB_DIR = _SOURCE_WEB if _SOURCE_WEB.is_dir() else Path(sys.prefix) / "share" / "tracker" / "web"
"""``web/`` of the source tree (an editable install), else where a wheel installed it."""

_MIME = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}
STREETS_PATH = "/web/streets.geojson"
STREETS_MAX_BYTES = 4 * MIB
"""Largest ``streets_file``: every browser that opens the map downloads it (gzipped)."""
STREETS_MAX_AGE_S = 300
"""How long browsers keep the streets before revalidating (ETag): a restarted demo may
draw another city."""


class Streets(NamedTuple):
    """The street layer, ready to send: as read, gzipped once, and its ETag (unquoted)."""

    raw: bytes
    gzipped: bytes
    etag: str


def load_streets(path: str) -> Streets:
    """Read and check ``streets_file``; :class:`ConfigError` naming the option if it is
    missing, too large or not a GeoJSON FeatureCollection."""
    where = f"{flag('streets_file')} {path!r} ({env_name('streets_file')})"
    try:
        with open(path, "rb") as file:
            raw = file.read(STREETS_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    if len(raw) > STREETS_MAX_BYTES:
        raise ConfigError(f"{where}: larger than {STREETS_MAX_BYTES // MIB} MiB")
    try:
        collection = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: not JSON: {exc}") from None
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        raise ConfigError(f"{where}: not a GeoJSON FeatureCollection")
    etag = hashlib.sha256(raw).hexdigest()[:20]
    return Streets(raw, gzip.compress(raw, compresslevel=9, mtime=0), etag)


def add_web_routes(app: QuartTrio, config: TrackerConfig) -> None:
    """Serve the pages and files of ``web/`` on ``app``."""
    root = Path(config.web_dir) if config.web_dir else WEB_DIR
    streets = load_streets(config.streets_file) if config.streets_file else None
    page_config: dict[str, object] = {
        "tile_url": config.tile_url,
        "tile_attribution": config.tile_attribution,
        "streets_url": STREETS_PATH if streets else None,
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

    if streets is not None:

        @app.get(STREETS_PATH)
        async def streets_layer() -> Response:
            return _streets_response(streets)

    @app.get("/web/<path:name>")
    async def web_file(name: str) -> Response:
        response = await send_from_directory(root, name)
        mime = _MIME.get(Path(name).suffix)
        if mime:
            response.mimetype = mime
        return response


def _streets_response(streets: Streets) -> Response:
    """The street layer, gzipped for clients that take it; 304 for one that has it."""
    headers = {
        "ETag": f'"{streets.etag}"',
        "Cache-Control": f"public, max-age={STREETS_MAX_AGE_S}",
        "Vary": "Accept-Encoding",
    }
    if request.if_none_match.contains(streets.etag):
        return Response(b"", status=304, headers=headers)
    if request.accept_encodings.quality("gzip") > 0:
        headers["Content-Encoding"] = "gzip"
        body = streets.gzipped
    else:
        body = streets.raw
    return Response(body, content_type="application/geo+json", headers=headers)
