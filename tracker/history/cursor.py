"""Continuation cursors of history pages: opaque to clients, checked strictly here.

A page that stops at its ``limit`` carries a cursor; the client sends it back as
``cursor=`` with the same query to get the next page. The cursor is base64url (no
padding) of a msgpack array ``[version, binding, ts, vehicle_id]``:

* ``binding``: 8 bytes of a BLAKE2b hash of the query it continues (the route, the
  vehicle or the area's cells, ``from`` and ``to``), so that a cursor sent with another
  query is refused (400) instead of silently reading something else;
* ``ts`` and ``vehicle_id``: where the last page ended (a track: the last time; an area
  query: the last vehicle and its last time; tracks have no vehicle there).

Not signed, on purpose: a cursor only says where to continue inside a window the caller
may read anyway (the token is checked again on every page), so one that decodes and fits
the window reads nothing the query itself could not. Anything else, hand-made or
truncated, is a 400 saying so, never a 500. Pure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math

import msgspec

from tracker.errors import BadRequest
from tracker.pings import MAX_VEHICLE_ID_CHARS

__all__ = [
    "MAX_CURSOR_CHARS",
    "bind_query",
    "decode_area_cursor",
    "decode_track_cursor",
    "encode_cursor",
]

MAX_CURSOR_CHARS = 256
"""Longest cursor looked at: a real one is under 120 characters."""
_VERSION = 1
_BINDING_BYTES = 8


class _Cursor(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    binding: bytes
    ts: float
    vehicle_id: str | None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Cursor)


def bind_query(route: str, subject: bytes, start: float, end: float) -> bytes:
    """What ties a cursor to its query: ``subject`` is the vehicle id or the area's cells."""
    text = _encoder.encode([route, subject, start, end])
    return hashlib.blake2b(text, digest_size=_BINDING_BYTES).digest()


def encode_cursor(binding: bytes, ts: float, vehicle_id: str | None = None) -> str:
    """The cursor continuing after ``ts`` (and ``vehicle_id``, in area queries)."""
    raw = _encoder.encode(_Cursor(_VERSION, binding, ts, vehicle_id))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_track_cursor(text: str, binding: bytes, *, start: float, end: float) -> float:
    """The time a track's page continues after; 400 unless ``text`` is a track cursor of
    this query (``binding``) inside its window."""
    cursor = _checked(text, binding, start, end)
    if cursor.vehicle_id is not None:
        raise _bad("it is the cursor of an area query")
    return cursor.ts


def decode_area_cursor(text: str, binding: bytes, *, start: float, end: float) -> tuple[str, float]:
    """The vehicle and time an area query's page continues after; 400 unless ``text`` is an
    area cursor of this query (``binding``) inside its window."""
    cursor = _checked(text, binding, start, end)
    if cursor.vehicle_id is None:
        raise _bad("it is the cursor of a track")
    if not 0 < len(cursor.vehicle_id) <= MAX_VEHICLE_ID_CHARS:
        raise _bad("its vehicle id is not one")
    return cursor.vehicle_id, cursor.ts


def _checked(text: str, binding: bytes, start: float, end: float) -> _Cursor:
    cursor = _parse(text)
    if cursor.binding != binding:
        raise _bad("it belongs to another query (send the same vehicle or area, from and to)")
    if not (math.isfinite(cursor.ts) and start <= cursor.ts < end):
        raise _bad("its position is outside the window")
    return cursor


def _parse(text: str) -> _Cursor:
    if len(text) > MAX_CURSOR_CHARS:
        raise _bad(f"it is longer than {MAX_CURSOR_CHARS} characters")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        cursor = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        # b64decode raises ValueError for non-ASCII text; msgspec a DecodeError for
        # anything that is not our array, and UnicodeDecodeError for a bad string.
        raise _bad("it does not decode") from exc
    if cursor.version != _VERSION:
        raise _bad("it is from another version of this tracker")
    return cursor


def _bad(why: str) -> BadRequest:
    return BadRequest(
        f"cursor= is not valid: {why}; pass back the cursor of the previous page unchanged, "
        "or leave it out to start from the beginning",
        param="cursor",
    )
