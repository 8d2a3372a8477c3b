"""``GET /vehicles/{id}/track`` and ``GET /history``: stored positions over HTTP.

``tracker.app`` registers both with :func:`add_history_routes`. What they answer is
specified in ``docs/history.md`` ("Reading history over HTTP"); the formats are
:mod:`tracker.history.formats`, the cursors :mod:`tracker.history.cursor`, the times
:mod:`tracker.history.times`.

* **Who reads what**: the same tokens as feeds (:class:`~tracker.auth.Readers`). A token
  for an area reads history in that area only: a track keeps the positions inside the
  token's cells (``filtered: true`` says that the token's area applied, whether or not
  a position was left out, so the answer tells nothing about where the vehicle was
  outside it), and an area query beyond the token's area is refused (403) like a feed.
  An ingest key is no token: it reads nothing (401).
* **Bounded work**: a window of at most :data:`MAX_TRACK_WINDOW_S` (tracks) or
  :data:`MAX_AREA_WINDOW_S` (areas), at most :data:`MAX_LIMIT` positions a page, areas as
  large as a feed's. A page is read, cut to the token's area, simplified and encoded in
  one call (``tracker.history.pages``) in a reader process, or a worker
  thread until those have started (:meth:`History.answer
  <tracker.history.writer.History.answer>`: its limiter bounds how many run at once,
  its deadline answers 503 past it), so the event loop only parses parameters and sends
  the bytes, and a query does not wait for the GIL behind ingest and ticks.
* **Pages, not streams**: each answer is one page of at most ``limit`` positions and the
  ``cursor`` of the next, because a page is bounded work the client can retry or resume,
  holds no thread or connection while a slow client reads, and is what the stores
  answer anyway.

No tasks.
"""

from __future__ import annotations

import functools
import logging
import time
import urllib.parse
from collections.abc import Collection, Mapping, Sequence

import h3.api.basic_int as h3i
import numpy as np
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.routing import PathConverter

from tracker.auth import Grant, Readers
from tracker.errors import BadRequest, ForbiddenVehicle, HistoryDisabled
from tracker.history.cursor import (
    bind_query,
    decode_area_cursor,
    decode_track_cursor,
)
from tracker.history.formats import CONTENT_TYPES, FORMATS
from tracker.history.pages import PageQuery, area_page, track_page
from tracker.history.times import check_window, parse_time
from tracker.history.writer import History
from tracker.pings import MAX_VEHICLE_ID_CHARS
from tracker.regions import AREA_PARAMS, MAX_QUERY_BYTES, parse_area_async
from tracker.service import Tracker

__all__ = [
    "MAX_AREA_WINDOW_S",
    "MAX_LIMIT",
    "MAX_TOLERANCE_M",
    "MAX_TRACK_WINDOW_S",
    "VehicleIdConverter",
    "add_history_routes",
    "parse_page_query",
    "parse_tolerance",
    "parse_vehicle_id",
    "to_resolution",
]

logger = logging.getLogger(__name__)

MAX_TRACK_WINDOW_S = 7 * 86_400.0
"""Longest window of a track query: a week (a week at one ping a second is 7 pages)."""
MAX_AREA_WINDOW_S = 86_400.0
"""Longest window of an area query: a day (every vehicle in the area, so far more data)."""
MAX_LIMIT = 100_000
"""Positions a page holds at most, and unless ``limit=`` asks for fewer (a day at one
ping a second fits one page: about 2.1 MB as msgpack, 4.3 MB as JSON)."""
MAX_TOLERANCE_M = 10_000.0
"""Largest simplification tolerance: 10 km already leaves a day's drive a few points."""
MAX_NUMBER_CHARS = 32
"""Longest ``limit=`` or ``tolerance_m=`` looked at."""
_PAGE_PARAMS = frozenset({"from", "to", "format", "limit", "cursor", "tolerance_m", "token"})


def parse_page_query(
    args: Mapping[str, Sequence[str]], *, now: float, retention_s: float, max_window_s: float
) -> PageQuery:
    """``from``, ``to``, ``format`` and ``limit`` of a history query; 400 for any bad one.

    Both times are required: a page's cursor continues one fixed window, which a ``to``
    defaulting to "now" would move between pages.
    """
    start = parse_time("from", _required(args, "from"))
    end = parse_time("to", _required(args, "to"))
    check_window(start, end, now=now, retention_s=retention_s, max_window_s=max_window_s)
    fmt = _single(args, "format") or "json"
    if fmt not in FORMATS:
        raise BadRequest(f"format={fmt[:20]!r} is not one of {list(FORMATS)}", param="format")
    return PageQuery(start, end, fmt, _limit(_single(args, "limit")))


def parse_tolerance(text: str | None) -> float | None:
    """``tolerance_m=`` in metres (None: no simplification); 400 unless 0..MAX_TOLERANCE_M."""
    if text is None:
        return None
    value = _number("tolerance_m", text)
    if not 0 <= value <= MAX_TOLERANCE_M:
        raise BadRequest(
            f"tolerance_m={text[:20]!r} is out of range: 0..{MAX_TOLERANCE_M:g} metres",
            param="tolerance_m",
        )
    return value or None


def parse_vehicle_id(text: str, raw_path: bytes) -> str:
    """The vehicle id ``text`` of the request path ``raw_path`` (as sent, percent-encoded);
    400 if no ping could have carried it. The server decodes an invalid UTF-8 path with
    replacement characters, so only the raw path shows it."""
    if not 0 < len(text) <= MAX_VEHICLE_ID_CHARS:
        raise BadRequest(
            f"a vehicle id has 1 to {MAX_VEHICLE_ID_CHARS} characters, not {len(text)}",
            param="vehicle_id",
        )
    try:
        urllib.parse.unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the vehicle id is not valid UTF-8", param="vehicle_id") from None
    return text


def to_resolution(cells: Collection[int], resolution: int) -> frozenset[int]:
    """``cells`` as cells of ``resolution``: their parents, or all their children."""
    converted: set[int] = set()
    for cell in cells:
        own = h3i.get_resolution(cell)
        if own > resolution:
            converted.add(h3i.cell_to_parent(cell, resolution))
        elif own < resolution:
            converted.update(h3i.cell_to_children(cell, resolution))
        else:
            converted.add(cell)
    return frozenset(converted)


def add_history_routes(
    app: QuartTrio, tracker: Tracker, *, readers: Readers, area_limiter: trio.CapacityLimiter
) -> None:
    """Serve ``/vehicles/{id}/track`` and ``/history`` on ``app``.

    ``readers`` decides who reads what, as for feeds; ``area_limiter`` is the feeds' own,
    so that large areas computed for history and for feeds wait in one line.
    """
    config = tracker.config
    resolution = config.h3_resolution
    app.url_map.converters["vehicle_id"] = VehicleIdConverter

    def reading() -> tuple[Grant | None, History, dict[str, list[str]]]:
        """Who asks, the history they read, and the query: checked in this order."""
        if len(request.query_string) > MAX_QUERY_BYTES:
            raise BadRequest(f"the query is longer than {MAX_QUERY_BYTES} bytes")
        grant = readers.grant(request)
        if tracker.history is None:
            raise HistoryDisabled(
                "history is not enabled on this tracker (start it with --history PATH or "
                "--history postgresql://...)"
            )
        return grant, tracker.history, request.args.to_dict(flat=False)

    @app.get("/vehicles/<vehicle_id:vehicle_id>/track")
    async def vehicle_track(vehicle_id: str) -> Response:
        grant, history, args = reading()
        vehicle_id = parse_vehicle_id(vehicle_id, request.scope.get("raw_path", b""))
        if grant is not None:
            grant.check_vehicle(vehicle_id, tracker.fleets)  # 403 beyond its vehicles, fleets
        query = parse_page_query(
            args,
            now=time.time(),
            retention_s=config.history_retention_s,
            max_window_s=MAX_TRACK_WINDOW_S,
        )
        tolerance_m = parse_tolerance(_single(args, "tolerance_m"))
        binding = bind_query("track", vehicle_id.encode(), query.start, query.end)
        cursor = _single(args, "cursor")
        after = None
        if cursor is not None:
            after = decode_track_cursor(cursor, binding, start=query.start, end=query.end)
        answer = functools.partial(
            track_page,
            vehicle_id=vehicle_id,
            query=query,
            after=after,
            binding=binding,
            cells=grant.cells if grant is not None else None,
            resolution=resolution,
            tolerance_m=tolerance_m,
        )
        body = await history.answer(answer)
        return Response(body, content_type=CONTENT_TYPES[query.fmt])

    @app.get("/history")
    async def area_history() -> Response:
        grant, history, args = reading()
        if grant is not None and grant.narrowed:
            raise ForbiddenVehicle(
                "the token is bound to vehicles or fleets: read their tracks "
                "(/vehicles/{id}/track), not an area's history"
            )
        query = parse_page_query(
            args,
            now=time.time(),
            retention_s=config.history_retention_s,
            max_window_s=MAX_AREA_WINDOW_S,
        )
        area = {name: values for name, values in args.items() if name not in _PAGE_PARAMS}
        if grant is not None and grant.cells is not None and not area.keys() & set(AREA_PARAMS):
            cells = grant.cells  # no area asked for: the token's whole area
        else:
            cells = await parse_area_async(
                area, resolution=resolution, max_cells=config.max_feed_cells, limiter=area_limiter
            )
        if grant is not None:
            grant.check(cells)
        subject = np.array(sorted(cells), dtype=np.uint64).tobytes()
        binding = bind_query("area", subject, query.start, query.end)
        cursor = _single(args, "cursor")
        after = None
        if cursor is not None:
            after = decode_area_cursor(cursor, binding, start=query.start, end=query.end)
        answer = functools.partial(
            area_page,
            cells=to_resolution(cells, history.resolution),
            query=query,
            after=after,
            binding=binding,
            # Positions come back by the store's cells; coarser ones reach beyond the area.
            exact=cells if history.resolution < resolution else None,
            resolution=resolution,
        )
        body = await history.answer(answer)
        return Response(body, content_type=CONTENT_TYPES[query.fmt])


class VehicleIdConverter(PathConverter):
    """Any vehicle id in a path: slashes included (as ``path``), and line breaks, which
    ``path`` refuses (a ping's id may hold any character). An empty path segment (a
    leading ``/``, or ``//``) still cannot be matched: werkzeug's router drops those."""

    regex = "(?s:.+?)"
    part_isolating = False  # werkzeug guesses True for a regex without "/"


def _required(args: Mapping[str, Sequence[str]], name: str) -> str:
    value = _single(args, name)
    if value is None:
        raise BadRequest(f"{name}= is required (Unix seconds or ISO 8601)", param=name)
    return value


def _single(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    """The one value of ``name`` (None if absent); 400 if it was given more than once."""
    values = args.get(name, ())
    if len(values) > 1:
        raise BadRequest(f"{name}= is given {len(values)} times; give it once", param=name)
    return values[0] if values else None


def _number(name: str, text: str) -> float:
    """A plain decimal number (no exponent, NaN, infinity, hex or underscores)."""
    if len(text) > MAX_NUMBER_CHARS or not _is_decimal(text):
        raise BadRequest(f"{name}={text[:20]!r} is not a number", param=name)
    return float(text)


def _is_decimal(text: str) -> bool:
    whole, _, fraction = text.partition(".")
    digits = whole + fraction
    return bool(digits) and digits.isascii() and digits.isdigit()


def _limit(text: str | None) -> int:
    if text is None:
        return MAX_LIMIT
    if len(text) > MAX_NUMBER_CHARS or not (text.isascii() and text.isdigit()):
        raise BadRequest(f"limit={text[:20]!r} is not a whole number", param="limit")
    limit = int(text)
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(
            f"limit={limit} is out of range: 1..{MAX_LIMIT} positions a page (follow the "
            "cursor for more)",
            param="limit",
            max_limit=MAX_LIMIT,
        )
    return limit
