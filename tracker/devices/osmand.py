"""The OsmAnd protocol, as the Traccar Client app and many GPS units send it: pure decoders.

Two forms (Traccar's ``OsmAndProtocolDecoder`` reads both, and so do we):

* **query**: ``GET`` or ``POST /?id=..&lat=..&lon=..&timestamp=..&speed=..`` (the same
  parameters may come as a form body). ``timestamp`` is Unix seconds, milliseconds (any
  value from 2^31 up), ISO 8601, or ``yyyy-MM-dd HH:mm:ss`` (UTC); ``speed`` is in
  **knots**; ``bearing`` or ``heading`` in degrees; ``location=lat,lon`` may replace
  ``lat`` and ``lon``; ``deviceid`` may replace ``id``. Other parameters (``altitude``,
  ``accuracy``, ``batt``, ``hdop``, ``cell``, ``wifi``...) are read by nobody here.
* **JSON**: what current Traccar Client versions POST: ``{"location": {"timestamp": ISO,
  "coords": {"latitude", "longitude", "speed" (m/s), "heading", ...}, "is_moving",
  "battery": {...}, ...}, "device_id": "..."}``. A negative speed or heading means unknown.

A missing timestamp means now (as in Traccar). Decoders raise
:class:`~tracker.errors.BadRequest` for a report that cannot be a ping (no id, no
position, not a number); range checks are :func:`tracker.ingest.check_ping`'s, as for
every ping. Owns no tasks.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping

import msgspec

from tracker.devices.identity import check_device_id
from tracker.errors import BadBody, BadRequest
from tracker.pings import Ping

__all__ = ["KNOT_M_S", "decode_json", "decode_query", "parse_timestamp"]

KNOT_M_S = 1852 / 3600
"""One knot in metres per second."""
MILLISECONDS_FROM = 2**31 - 1
"""A numeric timestamp this large or larger is in milliseconds (Traccar's rule)."""
MAX_NUMBER_CHARS = 64  # longer "numbers" are refused before float() or int() sees them


def _number(params: Mapping[str, str], *names: str) -> float | None:
    """The first of ``names`` present, as a float (400 if it is not a number)."""
    for name in names:
        text = params.get(name)
        if text is None or text == "":
            continue
        if len(text) > MAX_NUMBER_CHARS:
            raise BadRequest(f"{name} is not a number: {len(text)} characters")
        try:
            return float(text)
        except ValueError:
            raise BadRequest(f"{name} is not a number: {text[:20]!r}") from None
    return None


def parse_timestamp(value: str | float, *, now: float) -> float:
    """Unix seconds from any timestamp form OsmAnd devices send (400 if none fits)."""
    if isinstance(value, float | int):
        number = float(value)
    else:
        text = value.strip()
        if len(text) > MAX_NUMBER_CHARS:
            raise BadRequest(f"timestamp is not a time: {len(text)} characters")
        if not text:
            return now
        try:
            number = float(text)
        except ValueError:
            return _parse_date(text)
    if not math.isfinite(number):
        raise BadRequest("timestamp must be a finite number")
    return number / 1000 if number >= MILLISECONDS_FROM else number


def _parse_date(text: str) -> float:
    """ISO 8601, or ``yyyy-MM-dd HH:mm:ss``; a time without a zone is UTC."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"timestamp is not a time: {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _known(value: float | None) -> float | None:
    """None for a negative value: the apps' way of saying "unknown" (speed, heading)."""
    return None if value is None or value < 0 else value


def decode_query(params: Mapping[str, str], *, now: float) -> Ping:
    """The ping of one query-form report (one value per parameter: the last one sent)."""
    device_id = check_device_id(params.get("id") or params.get("deviceid"))
    lat, lon = _number(params, "lat"), _number(params, "lon")
    if (lat is None or lon is None) and params.get("location"):
        lat_text, _, lon_text = params["location"].partition(",")
        lat, lon = _number({"lat": lat_text}, "lat"), _number({"lon": lon_text}, "lon")
    if lat is None or lon is None:
        raise BadRequest("the report has no position: lat and lon (or location=lat,lon)")
    stamp = params.get("timestamp")
    speed = _known(_number(params, "speed"))
    return Ping(
        vehicle_id=device_id,
        lat=lat,
        lon=lon,
        ts=now if stamp is None else parse_timestamp(stamp, now=now),
        speed=None if speed is None else speed * KNOT_M_S,
        heading=_known(_number(params, "bearing", "heading")),
    )


class _Coords(msgspec.Struct):
    latitude: float
    longitude: float
    speed: float | None = None
    heading: float | None = None


class _Location(msgspec.Struct):
    coords: _Coords
    timestamp: str | float | None = None


class _Report(msgspec.Struct):
    location: _Location
    device_id: str | None = None


_report = msgspec.json.Decoder(_Report)


def decode_json(body: bytes, *, now: float, device_id: str | None = None) -> Ping:
    """The ping of one JSON report (``device_id``: from the query, if the body has none)."""
    try:
        report = _report.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        problem = "it is nested too deeply" if isinstance(exc, RecursionError) else exc
        raise BadBody(f"not a Traccar Client JSON location: {problem}") from None
    location, coords = report.location, report.location.coords
    stamp = location.timestamp
    return Ping(
        vehicle_id=check_device_id(report.device_id or device_id),
        lat=coords.latitude,
        lon=coords.longitude,
        ts=now if stamp is None else parse_timestamp(stamp, now=now),
        speed=_known(coords.speed),
        heading=_known(coords.heading),
    )
