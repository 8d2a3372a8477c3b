"""The HTTP face of the tracker: routes and error bodies, mapped onto the core's API.

``create_app`` builds a Quart-Trio app around one :class:`~tracker.service.Tracker`, and
only maps HTTP onto the core's API (``ingest``, ``open_feed``, ``locate``, ``health``,
``ready``); the core's tasks are run by ``tracker.server.serve``, not by the app's lifespan. Every
:class:`TrackerError` and every HTTP error becomes a JSON body
``{"error", "message", ...}``. Who may do what is decided by ``auth.py`` (tokens, ingest
keys) and ``limits.py``; ``headers.py`` adds CORS and the browser-safety headers to every
response.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tracker.alerts.routes import add_alert_routes
from tracker.auth import (
    COOKIE,
    Grant,
    Keyring,
    Readers,
    bearer,
    check_ingest_key,
    check_session_origin,
    ending_with_token,
)
from tracker.bodies import BodyReads
from tracker.devices.routes import add_device_routes
from tracker.direct import EXTENSION as DIRECT_FEED
from tracker.direct import Handoff, serve_feed
from tracker.errors import (
    BadRequest,
    ForbiddenArea,
    PayloadTooLarge,
    TrackerError,
    Unauthorized,
    UnknownVehicle,
    UnsupportedMediaType,
)
from tracker.fleets import narrowing
from tracker.headers import security_headers
from tracker.history.replay import Replays
from tracker.history.routes import VehicleIdConverter, add_history_routes
from tracker.ingest import media_is_json
from tracker.limits import IngestRate, StreamSlots, held_while_streaming
from tracker.links import add_link_routes
from tracker.logs import Throttle
from tracker.meta import add_meta_routes
from tracker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tracker.pings import MAX_VEHICLE_ID_CHARS
from tracker.regions import AREA_CONCURRENCY, AREA_PARAMS, MAX_QUERY_BYTES, parse_area_async
from tracker.service import Tracker
from tracker.views import View
from tracker.web import add_web_routes
from tracker.zones.routes import add_zone_routes

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

FEED_FORMATS = {"msgpack": False, "json": True}
SESSION_MAX_BYTES = 16 * 1024
"""Largest ``POST /session`` body: a token is a few hundred bytes (at most 8 KiB)."""
COOKIE_MAX_AGE_S = 400 * 86_400
"""Longest session cookie: browsers keep none longer (a token may outlive it)."""
REFUSAL_LOG_INTERVAL_S = 10.0
"""At most one INFO record this often about refused credentials (anyone can cause them)."""
_json = msgspec.json.Encoder()


def _json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded by msgspec (Structs included)."""
    return Response(_json.encode(body), status=status, content_type="application/json")


def _error_response(body: Any, status: int, headers: dict[str, str]) -> Response:
    """An error body; closes the connection if a request body was left unread.

    An ingest refused before its body was read (no key, wrong media type, too large)
    leaves that body on the connection, where it would be parsed as the next request.
    """
    response = _json_response(body, status)
    response.headers.update(headers)
    if request.method == "POST" and not g.get("body_read", False):
        response.headers["Connection"] = "close"
    return response


def create_app(tracker: Tracker) -> QuartTrio:
    """The ASGI app serving ``tracker``; run it with ``tracker.server.serve``."""
    config = tracker.config
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.ingest_max_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # feeds are endless; see docs/architecture.md
    keyring = Keyring.for_config(config)
    keyring.revoked = tracker.revocations.is_revoked
    readers = Readers(keyring, open_feeds=config.open_feeds)
    slots = StreamSlots(
        per_token=config.max_streams_per_token,
        per_address=config.max_streams_per_address,
        retry_after_s=max(1.0, config.retry_ms / 1000),
    )
    ingest_rate = IngestRate(config.ingest_rate_per_key)
    refusals = Throttle(logger, interval_s=REFUSAL_LOG_INTERVAL_S)
    area_limiter = trio.CapacityLimiter(AREA_CONCURRENCY)
    body_reads = BodyReads(config, tracker.metrics)
    replays = Replays(
        tracker.history,
        config,
        tracker.metrics,
        retention_s=config.history_retention_s,
        stopping=tracker.stopping,
    )
    tracker.metrics.gauges["replays"] = ("Replay feeds playing now.", lambda: replays.running)

    @app.errorhandler(TrackerError)
    async def tracker_error(error: TrackerError) -> Response:
        if error.status in (Unauthorized.status, ForbiddenArea.status):
            refusals.log(
                "refused %s %s: %s",
                request.method,
                request.path,
                error.message,
                address=request.remote_addr,
                code=error.code,
            )
        return _error_response(error.body(), error.status, error.headers())

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        if error.code == PayloadTooLarge.status:
            limit = config.ingest_max_bytes
            too_large = PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
            return _error_response(too_large.body(), too_large.status, {})
        name = (error.name or "error").lower().replace(" ", "_")
        body = {"error": name, "message": error.description or error.name}
        return _error_response(body, error.code or 500, {})

    @app.after_request
    async def add_security_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        security_headers(response.headers, request.path, request.method, origin, config)
        return response

    @app.post("/ingest")
    async def ingest() -> Response:
        key = request.headers.get("X-Ingest-Key") or ""
        fleet = check_ingest_key(key, tracker.fleets)
        media_is_json(request.content_type)  # 415 before reading the body
        body = await body_reads.read(request.body)
        g.body_read = True
        reply = await tracker.ingest_async(
            body,
            request.content_type,
            admit=functools.partial(ingest_rate.admit, key),
            fleet=fleet,
        )
        return _json_response(reply)

    @app.get("/feed")
    async def feed() -> Response:
        if len(request.query_string) > MAX_QUERY_BYTES:
            raise BadRequest(f"the query is longer than {MAX_QUERY_BYTES} bytes")
        grant = readers.grant(request)
        args = request.args.to_dict(flat=False)
        args.pop("token", None)
        fmt = args.pop("format", ["msgpack"])[-1]
        if fmt not in FEED_FORMATS:
            raise BadRequest(f"format {fmt!r} is not one of {sorted(FEED_FORMATS)}")
        narrow = narrowing(args, grant, tracker.fleets)  # fleet=, vehicles=, the token's
        narrowed = narrow.fleets is not None or narrow.vehicles is not None
        if narrowed and "from" in args:
            raise BadRequest("replays (from=) are of areas, not of fleets or vehicles")
        replay = replays.request(args, now=time.time()) if "from" in args else None
        cells: frozenset[int] | None
        if grant is not None and grant.cells is not None and not args.keys() & set(AREA_PARAMS):
            cells = grant.cells  # no area asked for: the token's whole area
        elif narrow.vehicles is not None and not args.keys() & set(AREA_PARAMS):
            cells = None  # vehicles, wherever they go
        else:
            cells = await parse_area_async(
                args,
                resolution=config.h3_resolution,
                max_cells=config.max_feed_cells,
                limiter=area_limiter,
            )
        if grant is not None and cells is not None:
            grant.check(cells)
        view = View(cells, narrow.fleets, narrow.vehicles)
        slot = slots.acquire(
            token=grant.holder if grant else None, address=request.remote_addr or "unknown"
        )
        last_event_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
        is_json = FEED_FORMATS[fmt]
        handoff = request.scope.get("extensions", {}).get(DIRECT_FEED)
        if replay is None and isinstance(handoff, Handoff):  # HTTP/1.1: see tracker.direct
            handoff.adopt(
                functools.partial(
                    serve_feed,
                    tracker,
                    view,
                    is_json=is_json,
                    last_event_id=last_event_id,
                    slot=slot,
                    expires=None if grant is None else grant.expires,
                    jti=None if grant is None else grant.jti,
                )
            )
            body = _nothing()  # the slot is serve_feed's to release
        elif replay is None:
            body = held_while_streaming(
                _feed_body(
                    tracker, view, is_json=is_json, last_event_id=last_event_id, grant=grant
                ),
                slot,
            )
        else:  # history through the same stream (tracker.history.replay)
            assert cells is not None  # a replay is of an area
            try:
                replayed = await replays.open(
                    replay, cells, is_json=is_json, last_event_id=last_event_id
                )
            except BaseException:
                slot.release()
                raise
            if replayed is None:  # resumed after its end: 204 stops EventSource
                slot.release()
                return Response(b"", status=204)
            # the hub ends live feeds with their tokens; a replay is ended here
            stream = (
                replayed if grant is None else ending_with_token(replayed, grant, keyring.revoked)
            )
            body = held_while_streaming(stream, slot)
        response = Response(body, content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    app.url_map.converters["vehicle_id"] = VehicleIdConverter  # ids with slashes (fleets)

    @app.get("/vehicles/<vehicle_id:vehicle_id>")
    async def vehicle(vehicle_id: str) -> Response:
        """Where one vehicle is now, wherever it is (a map's search box, follow mode).

        The same token and area rules as a feed of the vehicle's cell: 401 without a
        token where feeds need one, 403 outside the token's area.
        """
        grant = readers.grant(request)
        if len(vehicle_id) > MAX_VEHICLE_ID_CHARS:
            raise BadRequest(f"a vehicle id is at most {MAX_VEHICLE_ID_CHARS} characters")
        report = tracker.locate(vehicle_id)
        if report is None:
            raise UnknownVehicle(
                f"no vehicle {vehicle_id!r} is tracked here: never heard from, or silent "
                f"for more than {config.remove_after_s:g} s",
                vehicle_id=vehicle_id,
            )
        if grant is not None:
            grant.check(frozenset({int(report.cell, 16)}))
            grant.check_vehicle(vehicle_id, tracker.fleets)
        response = _json_response(report)
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.post("/session")
    async def open_session() -> Response:
        """Trade a token for an HttpOnly cookie, so pages need not keep it in URLs.

        Only from this tracker's own pages or a listed origin (login CSRF), and a body
        token only as ``application/json``, which no cross-site form can send.
        """
        check_session_origin(
            request.headers.get("Origin"),
            scheme=request.scheme,
            host=request.headers.get("Host"),
            allowed=config.cors_origin_list,
        )
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            token = _session_token(
                await _small_body(body_reads, request.mimetype, SESSION_MAX_BYTES)
            )
        grant = keyring.grant(token)
        response = _json_response({"expires": grant.expires, "area": grant.cells is not None})
        response.set_cookie(
            COOKIE,
            token,
            max_age=max(0, min(COOKIE_MAX_AGE_S, int(grant.expires - time.time()))),
            httponly=True,
            secure=request.scheme == "https",
            samesite="Strict",
        )
        return response

    @app.delete("/session")
    async def close_session() -> Response:
        response = _json_response({"closed": True})
        response.delete_cookie(COOKIE, httponly=True, samesite="Strict")
        return response

    add_alert_routes(
        app,
        tracker.alerts,
        tracker.webhooks,
        config=config,
        readers=readers,
        slots=slots,
        area_limiter=area_limiter,
        body_reads=body_reads,
        fleet_of=tracker.fleets.fleet_of,
    )
    add_web_routes(app, config)
    add_history_routes(app, tracker, readers=readers, area_limiter=area_limiter)
    add_device_routes(app, tracker.devices, body_reads)
    add_zone_routes(app, tracker.zones, readers=readers, body_reads=body_reads)
    add_link_routes(app, tracker, readers=readers, body_reads=body_reads)
    add_meta_routes(app, tracker, readers=readers, body_reads=body_reads)

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness: 200 while the core does its job, 503 saying what is wrong."""
        health = tracker.health()
        return _json_response(health, 200 if health.ok else 503)

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness for load balancers: 503 while starting and once shutdown began."""
        body = {"ready": tracker.ready, "state": tracker.lifecycle.value}
        return _json_response(body, 200 if tracker.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(tracker.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    return app


async def _feed_body(
    tracker: Tracker,
    view: View,
    *,
    is_json: bool,
    last_event_id: str | None,
    grant: Grant | None,
) -> AsyncIterator[bytes]:
    """A feed as a response body: opened on its first step, so that a response never sent
    leaves nothing behind, and closed however the response ends (at the latest when its
    token expires or is revoked)."""
    async with tracker.open_feed(
        view,
        is_json=is_json,
        last_event_id=last_event_id,
        expires=None if grant is None else grant.expires,
        jti=None if grant is None else grant.jti,
    ) as feed:
        async for chunk in feed:
            yield chunk


class _SessionBody(msgspec.Struct):
    token: str


async def _small_body(reads: BodyReads, mimetype: str, limit: int) -> bytes:
    """The request's JSON body, refused (415, 413) unless JSON and at most ``limit`` bytes."""
    if mimetype != "application/json":
        raise UnsupportedMediaType(
            f"POST /session takes a token as application/json, not {mimetype or '(none)'!r} "
            "(or send it as Authorization: Bearer)",
            allowed=["application/json"],
        )
    too_large = PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
    if (request.content_length or 0) > limit:
        raise too_large
    body = await reads.read(request.body, limit=limit)
    g.body_read = True
    return body


def _session_token(body: bytes) -> str:
    try:
        return msgspec.json.decode(body, type=_SessionBody).token
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        # msgspec raises RecursionError for deep nesting and UnicodeDecodeError (a
        # ValueError) for invalid UTF-8 in a string: both are bad input, not our fault.
        raise Unauthorized(
            'POST /session needs a token: Authorization: Bearer <token>, or {"token": ...}'
        ) from exc


async def _nothing() -> AsyncIterator[bytes]:
    """An empty streaming body: what a response handed to a direct feed carries."""
    return
    yield
