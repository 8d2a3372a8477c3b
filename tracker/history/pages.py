"""A history page, computed whole where it is computed: read, cut, simplified, encoded.

:func:`track_page` and :func:`area_page` are what ``GET /vehicles/{id}/track`` and ``GET
/history`` answer (``tracker.history.routes`` parses and checks the request, binds one of
them with :func:`functools.partial`, and hands it to ``History.answer``). They run in a
reader process (``tracker.history.readers``) or a worker thread, so they are module-level
functions of plain arguments (they pickle), in a module that imports only what they need:
a reader process imports it when it starts, not the web framework. Pure and synchronous.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import h3.api.basic_int as h3i
import numpy as np

from tracker.history.cursor import encode_cursor
from tracker.history.formats import AreaResult, TrackResult, encode_area, encode_track
from tracker.history.simplify import simplify, subset
from tracker.history.store import HistoryStore, Track

__all__ = ["PageQuery", "area_page", "track_page"]


class PageQuery(NamedTuple):
    """What every history query asks for, checked: a window, a format and a page size."""

    start: float
    end: float
    fmt: str
    limit: int


def track_page(
    store: HistoryStore,
    *,
    vehicle_id: str,
    query: PageQuery,
    after: float | None,
    binding: bytes,
    cells: frozenset[int] | None,
    resolution: int,
    tolerance_m: float | None,
) -> bytes:
    """A track page, read, cut to ``cells``, simplified and encoded: the whole answer, in
    a reader process or a worker thread (``History.read``), so the event loop only
    parses parameters and sends the bytes. A module-level function, so that it pickles."""
    track = store.track(vehicle_id, query.start, query.end, limit=query.limit, after=after)
    full = len(track) >= query.limit
    following = encode_cursor(binding, float(track.ts[-1])) if full else None
    kept = simplify(_inside(track, cells, resolution), tolerance_m or 0.0)
    result = TrackResult(kept, query.start, query.end, following, cells is not None, tolerance_m)
    return encode_track(result, query.fmt)


def area_page(
    store: HistoryStore,
    *,
    cells: frozenset[int],
    query: PageQuery,
    after: tuple[str, float] | None,
    binding: bytes,
    exact: frozenset[int] | None,
    resolution: int,
) -> bytes:
    """An area page (the store's ``cells``), read, cut to ``exact`` and encoded, as
    :func:`track_page` is."""
    page = store.area(cells, query.start, query.end, limit=query.limit, after=after)
    following = None
    if page.cursor is not None:
        following = encode_cursor(binding, page.cursor[1], page.cursor[0])
    tracks = [_inside(track, exact, resolution) for track in page.tracks]
    result = AreaResult([t for t in tracks if len(t)], query.start, query.end, following)
    return encode_area(result, query.fmt)


def _inside(track: Track, cells: frozenset[int] | None, resolution: int) -> Track:
    """The positions of ``track`` in ``cells`` (at ``resolution``); all of them for None."""
    if cells is None or not len(track):
        return track
    cell = functools.partial(h3i.latlng_to_cell, res=resolution)
    mask = np.fromiter(
        (
            cell(lat, lon) in cells
            for lat, lon in zip(track.lat.tolist(), track.lon.tolist(), strict=True)
        ),
        dtype=np.bool_,
        count=len(track),
    )
    return track if mask.all() else subset(track, mask)
