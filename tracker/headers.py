"""Response headers that keep browsers safe: CORS for feeds, framing, referrers, sniffing.

Applied to every response by one ``after_request`` hook (``app.py``):

* **CORS** (``cors_origins``): a page on another origin may read ``/feed``,
  ``/vehicles/...`` and ``/healthz``, and import the browser modules under ``/web/``
  (``import { FeedClient } from "https://tracker/web/feed-client.js"`` is a CORS request),
  only if its origin is listed (or the list is ``*``). A listed origin is echoed with
  ``Access-Control-Allow-Credentials`` so the session cookie works across origins; ``*``
  allows anyone but never with credentials (browsers forbid it, and tokens in URLs do not
  need it). Preflights (``OPTIONS /feed``) are answered here too.
* ``Cross-Origin-Resource-Policy`` on ``/web/``: ``cross-origin`` once any origin is
  allowed (so pages isolated with COEP may load the files), else ``same-origin``.
* **Framing**: ``/embed`` may be framed by ``frame_ancestors``; nothing else may be framed.
* ``Referrer-Policy: no-referrer``: feed and embed URLs carry tokens; a page must not leak
  them to the sites it links to. ``X-Content-Type-Options: nosniff`` everywhere.
"""

from __future__ import annotations

from werkzeug.datastructures import Headers

from tracker.config import TrackerConfig

__all__ = [
    "BASELINE_HEADERS",
    "CORS_PATHS",
    "CORS_PREFIXES",
    "EMBED_PATH",
    "cors_headers",
    "preflight_headers",
    "security_headers",
]

CORS_PATHS = frozenset({"/feed", "/healthz"})
"""Paths other origins may read when allowed; ingest is for servers, not browsers."""
CORS_PREFIXES = ("/web/", "/vehicles/")
"""Path prefixes other origins may read when allowed: the browser modules, vehicles."""
WEB_PREFIX = "/web/"

EMBED_PATH = "/embed"

_ALLOW_HEADERS = "Authorization, Last-Event-ID, Cache-Control"

BASELINE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "frame-ancestors 'none'",
}
"""What every response carries, including the ones the HTTP server makes up itself
(``tracker.transport`` adds them to Hypercorn's own 400, 431, ... responses)."""


def cors_headers(origin: str | None, path: str, config: TrackerConfig) -> dict[str, str]:
    """The CORS headers a response to ``origin`` gets (none if it is not allowed)."""
    allowed = config.cors_origin_list
    if not allowed or not _readable_across_origins(path):
        return {}
    # Answered with or without an Origin: a cached response must suit the next asker too.
    if origin is not None and origin in allowed:
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }
    if "*" in allowed:
        vary = {"Vary": "Origin"} if len(allowed) > 1 else {}  # listed ones get their own
        return {"Access-Control-Allow-Origin": "*", **vary}
    return {"Vary": "Origin"}


def _readable_across_origins(path: str) -> bool:
    return path in CORS_PATHS or path.startswith(CORS_PREFIXES)


def preflight_headers(origin: str | None, path: str, config: TrackerConfig) -> dict[str, str]:
    """The answer to a CORS preflight: what an allowed origin may send, cached 10 minutes."""
    headers = cors_headers(origin, path, config)
    if "Access-Control-Allow-Origin" in headers:
        headers |= {
            "Access-Control-Allow-Methods": "GET, OPTIONS",
            "Access-Control-Allow-Headers": _ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        }
    return headers


def security_headers(
    headers: Headers,
    path: str,
    method: str,
    origin: str | None,
    config: TrackerConfig,
) -> None:
    """Add this module's headers to a response's ``headers`` (preflights included)."""
    cors = preflight_headers if method == "OPTIONS" else cors_headers
    headers.update(cors(origin, path, config))
    headers.update(BASELINE_HEADERS)
    if path == EMBED_PATH:
        headers["Content-Security-Policy"] = f"frame-ancestors {config.frame_ancestors}"
    if path.startswith(WEB_PREFIX):
        shared = "cross-origin" if config.cors_origin_list else "same-origin"
        headers["Cross-Origin-Resource-Policy"] = shared
