"""The HTTP face of the tracker: routes, error bodies, and the lifespan that runs the core.

``create_app`` builds a Quart-Trio app around one :class:`~tracker.service.Tracker`. The
app's lifespan nursery (``app.nursery``, owned by Quart-Trio for the life of the server)
holds the ticker task; ``after_serving`` stops it. Every :class:`TrackerError` and every
HTTP error becomes a JSON body ``{"error", "message", ...}``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tracker.errors import BadRequest, PayloadTooLarge, TrackerError
from tracker.feed import feed_stream
from tracker.ingest import ingest_body, media_is_json
from tracker.regions import parse_area
from tracker.service import Tracker

__all__ = ["create_app"]

FEED_FORMATS = {"msgpack": False, "json": True}
_json = msgspec.json.Encoder()


def _json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded by msgspec (Structs included)."""
    return Response(_json.encode(body), status=status, content_type="application/json")


def create_app(tracker: Tracker) -> QuartTrio:
    """The ASGI app serving ``tracker``; run it with ``tracker.server.serve``."""
    config = tracker.config
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.ingest_max_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # feeds are endless; see docs/architecture.md

    @app.before_serving
    async def start_core() -> None:
        await app.nursery.start(tracker.run)

    @app.after_serving
    async def stop_core() -> None:
        tracker.stop()

    @app.errorhandler(TrackerError)
    async def tracker_error(error: TrackerError) -> Response:
        return _json_response(error.body(), error.status)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        if error.code == PayloadTooLarge.status:
            limit = config.ingest_max_bytes
            too_large = PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
            return _json_response(too_large.body(), too_large.status)
        name = (error.name or "error").lower().replace(" ", "_")
        body = {"error": name, "message": error.description or error.name}
        return _json_response(body, error.code or 500)

    @app.post("/ingest")
    async def ingest() -> Response:
        media_is_json(request.content_type)  # 415 before reading the body
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        assert isinstance(body, bytes)
        reply = ingest_body(
            body,
            request.content_type,
            index=tracker.index,
            config=config,
            metrics=tracker.metrics,
            now=time.time(),
        )
        return _json_response(reply)

    @app.get("/feed")
    async def feed() -> Response:
        args = request.args.to_dict(flat=False)
        fmt = args.pop("format", ["msgpack"])[-1]
        if fmt not in FEED_FORMATS:
            raise BadRequest(f"format {fmt!r} is not one of {sorted(FEED_FORMATS)}")
        cells = parse_area(args, resolution=config.h3_resolution, max_cells=config.max_feed_cells)
        last_event_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
        stream = feed_stream(
            tracker.hub,
            cells,
            is_json=FEED_FORMATS[fmt],
            last_event_id=last_event_id,
            retry_ms=config.retry_ms,
            heartbeat_s=config.heartbeat_s,
            metrics=tracker.metrics,
        )
        response = Response(stream, content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json_response(
            {
                "status": "ok",
                "tick": tracker.index.tick,
                "vehicles": tracker.index.vehicle_count,
                "subscribers": tracker.hub.subscriber_count,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            tracker.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
