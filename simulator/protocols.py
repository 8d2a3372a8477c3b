"""How each device protocol carries one ping: the requests the apps send, for the simulator
and the benchmarks (``tracker simulate --protocol``, ``python -m bench.ingest --protocol``).

* ``ingest``: our batched ``POST /ingest`` (msgpack), not built here;
* ``osmand``: a ``GET /osmand`` query as Traccar Client sends it (speed in knots);
* ``owntracks-http``: ``POST /owntracks`` with an OwnTracks ``location`` (speed in km/h),
  the device as ``X-Limit-U``/``X-Limit-D`` and the key as the Basic password;
* ``owntracks-mqtt``: the same JSON published to ``owntracks/<user>/<vehicle>``.

OwnTracks devices are ``<user>/<vehicle>`` on the tracker (``OWNTRACKS_USER``).
"""

from __future__ import annotations

import base64

import msgspec

from tracker.pings import Ping

__all__ = [
    "OWNTRACKS_USER",
    "PROTOCOLS",
    "osmand_query",
    "owntracks_headers",
    "owntracks_location",
    "owntracks_topic",
]

PROTOCOLS = ("ingest", "osmand", "owntracks-http", "owntracks-mqtt")
OWNTRACKS_USER = "sim"
KNOTS_PER_M_S = 3600 / 1852
KMH_PER_M_S = 3.6
_json = msgspec.json.Encoder()


def osmand_query(ping: Ping, key: str) -> dict[str, str]:
    """The query parameters of one OsmAnd report (``GET /osmand?...``)."""
    query = {"id": ping.vehicle_id, "lat": f"{ping.lat:.6f}", "lon": f"{ping.lon:.6f}"}
    query["timestamp"] = str(int(ping.ts))
    if ping.speed is not None:
        query["speed"] = f"{ping.speed * KNOTS_PER_M_S:.2f}"
    if ping.heading is not None:
        query["bearing"] = f"{ping.heading:.1f}"
    query["key"] = key
    return query


def owntracks_location(ping: Ping) -> bytes:
    """An OwnTracks ``location`` message, as the app publishes it."""
    message: dict[str, object] = {
        "_type": "location",
        "lat": round(ping.lat, 6),
        "lon": round(ping.lon, 6),
        "tst": int(ping.ts),
        "tid": ping.vehicle_id[-2:],
    }
    if ping.speed is not None:
        message["vel"] = round(ping.speed * KMH_PER_M_S)
    if ping.heading is not None:
        message["cog"] = round(ping.heading)
    return _json.encode(message)


def owntracks_headers(vehicle_id: str, key: str) -> dict[str, str]:
    """The headers of the app's HTTP mode: user and device, and Basic credentials."""
    basic = base64.b64encode(f"{OWNTRACKS_USER}:{key}".encode()).decode()
    return {
        "Content-Type": "application/json",
        "X-Limit-U": OWNTRACKS_USER,
        "X-Limit-D": vehicle_id,
        "Authorization": f"Basic {basic}",
    }


def owntracks_topic(vehicle_id: str) -> str:
    """The topic the app publishes a vehicle's locations to."""
    return f"owntracks/{OWNTRACKS_USER}/{vehicle_id}"
