"""OwnTracks messages (its JSON format, over HTTP or MQTT): pure decoders.

The app publishes JSON objects tagged by ``_type``; only ``location`` carries a position:
``lat``, ``lon``, ``tst`` (Unix seconds), ``vel`` (**km/h**), ``cog`` (degrees), ``tid``
(two letters shown on maps), and more we do not read (``acc``, ``alt``, ``batt``...).
Every other type (``transition``, ``waypoint``, ``lwt``, ``card``, ``status``...) is
acknowledged and skipped; ``encrypted`` payloads are skipped too (we hold no key).

The device id is not in the message: over HTTP it is ``user/device`` from ``X-Limit-U``
and ``X-Limit-D`` (or the Basic auth user), over MQTT the topic's ``owntracks/user/device``.
Decoders raise :class:`~tracker.errors.BadBody` for what is not an OwnTracks message.
Owns no tasks.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from tracker.devices.identity import check_device_id
from tracker.errors import BadBody
from tracker.pings import Ping

__all__ = ["KMH_M_S", "decode_message", "device_from_topic", "message_type"]

_T = TypeVar("_T")

KMH_M_S = 1 / 3.6
"""One km/h in metres per second."""


class _Tagged(msgspec.Struct):
    type: str = msgspec.field(name="_type", default="")


class _Location(msgspec.Struct):
    lat: float
    lon: float
    tst: float
    vel: float | None = None
    cog: float | None = None


_tagged = msgspec.json.Decoder(_Tagged)
_location = msgspec.json.Decoder(_Location)


def _decode(decoder: msgspec.json.Decoder[_T], payload: bytes) -> _T:
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        problem = "it is nested too deeply" if isinstance(exc, RecursionError) else exc
        raise BadBody(f"not an OwnTracks message: {problem}") from None


def message_type(payload: bytes) -> str:
    """The message's ``_type`` (400 if the payload is not a JSON object)."""
    return _decode(_tagged, payload).type


def decode_message(payload: bytes, device_id: str) -> Ping | None:
    """The ping of a ``location`` message; None for any other type (skipped)."""
    if message_type(payload) != "location":
        return None
    location = _decode(_location, payload)
    vel, cog = location.vel, location.cog
    return Ping(
        vehicle_id=check_device_id(device_id),
        lat=location.lat,
        lon=location.lon,
        ts=location.tst,
        speed=None if vel is None or vel < 0 else vel * KMH_M_S,
        heading=None if cog is None or cog < 0 else cog,
    )


def device_from_topic(topic: str) -> str:
    """``user/device`` of an ``owntracks/user/device`` topic (its last two levels)."""
    levels = topic.split("/")
    if len(levels) < 3 or not all(levels[-2:]):
        raise BadBody(f"topic {topic[:80]!r} is not prefix/user/device")
    return check_device_id("/".join(levels[-2:]))
