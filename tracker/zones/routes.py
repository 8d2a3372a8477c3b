"""``/zones``: create, read, replace and delete zones over HTTP, as GeoJSON.

``tracker.app`` registers them with :func:`add_zone_routes`. What they answer is
specified in ``docs/zones.md`` ("The API").

* **Who**: writing (POST, PUT, DELETE) needs an admin token
  (:meth:`Readers.admin <tracker.auth.Readers.admin>`: 401, 403 ``admin_required``);
  reading needs what a feed needs (:meth:`Readers.grant <tracker.auth.Readers.grant>`),
  and a token for an area sees the zones that reach into it (a zone outside it is
  404, as if it did not exist).
* **Bounded work**: a body of at most :data:`MAX_BODY_BYTES`, at most
  :data:`MAX_BATCH` zones a POST, at most :data:`MAX_PAGE` zones a page (``limit=``,
  then ``after=`` the last id for the next page). A body over
  :data:`INLINE_BODY_BYTES` is decoded and validated in a worker thread, one at a time
  with the compiling of zones (``ZoneBook.limiter``: each thread that holds the GIL
  delays the loop too, so they are not let in in numbers; a 1 MB body costs tens of
  milliseconds of CPU, which on the loop would hold ``/healthz``, ingest and feeds).
* ``GET /zones?bbox=west,south,east,north``: the zones whose bounds (margin included)
  meet the box; a box that is not four finite numbers in range, west < east and
  south < north, is 400 (``bad_area``) with the reason.

No tasks.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from tracker.auth import Readers
from tracker.bodies import BodyReads
from tracker.errors import BadBody, BadRequest, TrackerError, UnsupportedMediaType
from tracker.regions import MAX_QUERY_BYTES, parse_bbox
from tracker.zones.book import Area, ZoneBook
from tracker.zones.cover import CompiledZone
from tracker.zones.model import Zone, parse_zone

__all__ = ["MAX_BATCH", "MAX_BODY_BYTES", "MAX_PAGE", "UnknownZone", "add_zone_routes"]

MAX_BODY_BYTES: Final = 4 * 1024 * 1024
"""Largest body of a POST or PUT (a 10,000-vertex zone takes about 400 kB)."""
MAX_BATCH: Final = 1_000
"""Zones one POST of a FeatureCollection creates at most."""
MAX_PAGE: Final = 1_000
DEFAULT_PAGE: Final = 100
MEDIA_TYPES: Final = ("application/json", "application/geo+json")
INLINE_BODY_BYTES: Final = 64 * 1024
"""Bodies up to this size are decoded on the loop (a thread hop costs more)."""


class UnknownZone(TrackerError):
    """No zone by that id (or none the token may see)."""

    status = 404
    code = "unknown_zone"


def add_zone_routes(
    app: QuartTrio, book: ZoneBook, *, readers: Readers, body_reads: BodyReads
) -> None:
    """Serve ``/zones`` and ``/zones/{id}`` on ``app``."""

    def seen(zone_id: str) -> CompiledZone:
        """The zone, if the request's token may see it; 404 otherwise."""
        grant = readers.grant(request)
        compiled = book.get(zone_id)
        area = Area(grant.cells if grant is not None else None)
        if compiled is None or not area.sees(compiled):
            raise UnknownZone(f"no zone {zone_id[:80]!r}", id=zone_id[:80])
        return compiled

    @app.post("/zones")
    async def create_zones() -> Response:
        readers.admin(request)
        zones, collection = await _zones_of(book, await _body(body_reads), None)
        await book.put(zones, replace=False)
        if collection:
            return _json({"type": "FeatureCollection", "features": _features(zones)}, 201)
        return _json(zones[0].feature(), 201, location=f"/zones/{zones[0].id}")

    @app.get("/zones")
    async def list_zones() -> Response:
        if len(request.query_string) > MAX_QUERY_BYTES:
            raise BadRequest(f"the query is longer than {MAX_QUERY_BYTES} bytes")
        grant = readers.grant(request)
        area = Area(grant.cells if grant is not None else None)
        limit = _limit(request.args.get("limit"))
        after = request.args.get("after", "")
        kind = request.args.get("kind")
        box = _box(request.args.getlist("bbox"))
        page: list[dict[str, Any]] = []
        following = None
        for compiled in book.all():
            zone = compiled.zone
            if zone.id <= after or (kind is not None and zone.kind != kind):
                continue
            if box is not None and not _meets(compiled, box):
                continue
            if not area.sees(compiled):
                continue
            if len(page) == limit:
                following = page[-1]["id"]
                break
            page.append(zone.feature())
        body: dict[str, Any] = {"type": "FeatureCollection", "features": page}
        if following is not None:
            body["next"] = following
        return _json(body)

    @app.get("/zones/<zone_id>")
    async def get_zone(zone_id: str) -> Response:
        return _json(seen(zone_id).zone.feature())

    @app.put("/zones/<zone_id>")
    async def put_zone(zone_id: str) -> Response:
        readers.admin(request)
        (zone,), _ = await _zones_of(book, await _body(body_reads), zone_id)
        (new,) = await book.put([zone], replace=True)
        return _json(zone.feature(), 201 if new else 200)

    @app.delete("/zones/<zone_id>")
    async def delete_zone(zone_id: str) -> Response:
        readers.admin(request)
        if not await book.delete(zone_id):
            raise UnknownZone(f"no zone {zone_id[:80]!r}", id=zone_id[:80])
        return Response(b"", status=204)


async def _body(body_reads: BodyReads) -> bytes:
    """The request's body (415 for another media type; 413, 400 as for any body)."""
    if request.mimetype not in MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"zones are GeoJSON: Content-Type application/geo+json or application/json, "
            f"not {request.mimetype[:60] or '(none)'!r}",
            allowed=list(MEDIA_TYPES),
        )
    return await body_reads.read(request.body, limit=MAX_BODY_BYTES)


async def _zones_of(book: ZoneBook, body: bytes, zone_id: str | None) -> tuple[list[Zone], bool]:
    """The zones of a body (whether it was a FeatureCollection); a large body in a worker
    thread. ``zone_id``: the id of ``PUT /zones/{id}`` (a single Feature only)."""
    if len(body) <= INLINE_BODY_BYTES:
        return _decode_zones(body, zone_id)
    return await trio.to_thread.run_sync(_decode_zones, body, zone_id, limiter=book.limiter)


def _decode_zones(body: bytes, zone_id: str | None) -> tuple[list[Zone], bool]:
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than msgspec follows; ValueError: invalid UTF-8.
        raise BadBody(f"the body is not JSON: {str(exc)[:200]}") from exc
    collection = isinstance(document, dict) and document.get("type") == "FeatureCollection"
    if zone_id is None and collection:
        return _collection(document), True
    return [parse_zone(document, zone_id=zone_id)], False


def _box(values: list[str]) -> tuple[float, float, float, float] | None:
    """The ``bbox=`` of a listing (None: none given)."""
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("give at most one bbox=", param="bbox")
    return parse_bbox(values[0])


def _meets(compiled: CompiledZone, box: tuple[float, float, float, float]) -> bool:
    """Whether the zone's bounds (its margin included) meet ``box``."""
    west, south, east, north = compiled.outer.bounds
    return bool(west <= box[2] and east >= box[0] and south <= box[3] and north >= box[1])


def _collection(document: dict[str, Any]) -> list[Zone]:
    features = document.get("features")
    if not isinstance(features, list) or not 1 <= len(features) <= MAX_BATCH:
        raise BadRequest(f"a FeatureCollection holds 1 to {MAX_BATCH} zones", at="features")
    zones: list[Zone] = []
    for number, feature in enumerate(features):
        try:
            zones.append(parse_zone(feature))
        except TrackerError as error:
            error.details["feature"] = number
            raise
    ids = [zone.id for zone in zones]
    if len(set(ids)) != len(ids):
        raise BadRequest("two features of the collection have the same id", at="features")
    return zones


def _features(zones: list[Zone]) -> list[dict[str, Any]]:
    return [zone.feature() for zone in zones]


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE
    if len(text) > 8 or not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PAGE:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_PAGE}", param="limit")
    return int(text)


def _json(body: Any, status: int = 200, *, location: str | None = None) -> Response:
    encoded = msgspec.json.encode(body)
    response = Response(encoded, status=status, content_type="application/geo+json")
    if location is not None:
        response.headers["Location"] = location
    return response
