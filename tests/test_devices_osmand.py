"""The OsmAnd decoders on requests written from Traccar's protocol documentation and the
Traccar Client app's JSON; then what devices get wrong or attackers send."""

from __future__ import annotations

import urllib.parse

import pytest

from tracker.devices.osmand import KNOT_M_S, decode_json, decode_query, parse_timestamp
from tracker.errors import BadRequest

NOW = 1_750_000_000.0


def _query(url: str) -> dict[str, str]:
    """A recorded request line's query as the route hands it over (last value wins)."""
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


# Recorded requests (as the Traccar docs and its decoder tests show them).
RECORDED = [
    "/?id=902064&lat=42.06288&lon=-88.23412&timestamp=2016-01-27T18%3A55%3A47Z&hdop=6.0"
    "&altitude=224.0&speed=0.0",
    "/?id=902064&lat=42.06288&lon=-88.23412&timestamp=1442068686579&hdop=6.0&altitude=224.0"
    "&speed=0.0",
    "/?lat=49.60688&lon=6.15788&timestamp=2014-06-04+09%3A10%3A11&altitude=384.7&speed=0.0"
    "&id=353861053849681",
    "/?id=123456&timestamp=1377177267&lat=60.0&lon=30.0&speed=0.0&bearing=0.0&altitude=0&hdop=0.0",
    "/?lat=60.0&lon=30.0&speed=0.0&heading=0.0&vacc=0&hacc=0&altitude=0&deviceid=123456",
    "/?id=861001000719969&lat=41.666667&lon=-0.883333&altitude=350.059479&speed=0.000000&batt=87",
    "/?id=123456&timestamp=1377177267&location=60.0,30.0",
    "/?id=123456789012345&timestamp=1504763810&lat=40.7232948571&lon=-74.0061408571"
    "&bearing=7.19889788244&speed=40&ignition=true&rpm=933&fuel=24",
]

TRACCAR_CLIENT_JSON = (
    b'{"location":{"timestamp":"2025-06-15T13:45:12.862Z","coords":{"latitude":37.4219983,'
    b'"longitude":-122.084,"accuracy":5,"speed":0,"heading":-1,"altitude":5},"is_moving":false,'
    b'"odometer":0,"event":"motionchange","battery":{"level":1,"is_charging":false},'
    b'"activity":{"type":"still"},"extras":{},"_":"&id=48241179&lat=37.4219983&lon=-122.084'
    b'&timestamp=2025-06-15T13:45:12.862Z&"},"device_id":"48241179"}'
)
TRACCAR_CLIENT_IOS_JSON = (
    b'{"location":{"event":"motionchange","is_moving":false,"uuid":"0e9a2473",'
    b'"timestamp":"2021-07-21T08:06:34.444Z","odometer":0,"coords":{"latitude":-6.1148096,'
    b'"longitude":106.6837015,"accuracy":3.8,"speed":18.67,"speed_accuracy":0.26,"heading":63,'
    b'"heading_accuracy":0.28,"altitude":35.7,"altitude_accuracy":3.8},"activity":{"type":'
    b'"still","confidence":100},"battery":{"is_charging":false,"level":0.79},"extras":{}},'
    b'"device_id":"8737767034"}'
)


@pytest.mark.parametrize("url", RECORDED)
def test_decode_query_reads_every_recorded_request(url: str) -> None:
    ping = decode_query(_query(url), now=NOW)
    assert ping.vehicle_id in {
        "902064",
        "353861053849681",
        "123456",
        "861001000719969",
        "123456789012345",
    }
    assert -90 < ping.lat < 90 and -180 < ping.lon < 180


def test_decode_query_units_and_times() -> None:
    ping = decode_query(_query(RECORDED[-1]), now=NOW)
    assert ping.speed == pytest.approx(40 * KNOT_M_S)  # knots in, m/s in the ping
    assert ping.heading == pytest.approx(7.19889788244)
    assert ping.ts == 1504763810
    assert decode_query(_query(RECORDED[1]), now=NOW).ts == pytest.approx(1442068686.579)
    assert decode_query(_query(RECORDED[0]), now=NOW).ts == 1453920947  # ISO 8601, Z
    assert decode_query(_query(RECORDED[2]), now=NOW).ts == 1401873011  # "yyyy-MM-dd HH:mm:ss"
    assert decode_query(_query(RECORDED[5]), now=NOW).ts == NOW  # none sent: now
    located = decode_query(_query(RECORDED[6]), now=NOW)
    assert (located.lat, located.lon) == (60.0, 30.0)


def test_decode_json_reads_traccar_client_reports() -> None:
    android = decode_json(TRACCAR_CLIENT_JSON, now=NOW)
    assert (android.vehicle_id, android.lat, android.lon) == ("48241179", 37.4219983, -122.084)
    assert android.ts == pytest.approx(1749995112.862)
    assert android.heading is None  # -1: unknown
    ios = decode_json(TRACCAR_CLIENT_IOS_JSON, now=NOW)
    assert (ios.speed, ios.heading) == (18.67, 63)  # m/s as sent
    no_id = TRACCAR_CLIENT_JSON.replace(b',"device_id":"48241179"', b"")
    assert decode_json(no_id, now=NOW, device_id="from-query").vehicle_id == "from-query"


@pytest.mark.parametrize(
    "query",
    [
        {"lat": "1", "lon": "2"},  # no id
        {"id": "x" * 65, "lat": "1", "lon": "2"},
        {"id": "a\x00b", "lat": "1", "lon": "2"},
        {"id": "a", "lat": "1"},  # no position
        {"id": "a", "lat": "north", "lon": "2"},
        {"id": "a", "lat": "1" * 5000, "lon": "2"},
        {"id": "a", "lat": "1", "lon": "2", "timestamp": "9" * 5000},
        {"id": "a", "lat": "1", "lon": "2", "timestamp": "yesterday"},
        {"id": "a", "lat": "1", "lon": "2", "timestamp": "nan"},
        {"id": "a", "lat": "1", "lon": "2", "timestamp": "1e999"},
        {"id": "a", "location": "1"},
    ],
)
def test_decode_query_refuses_what_cannot_be_a_ping(query: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        decode_query(query, now=NOW)


def test_decode_query_leaves_range_checks_to_the_common_path() -> None:
    ping = decode_query({"id": "a", "lat": "nan", "lon": "1e999", "speed": "inf"}, now=NOW)
    assert ping.lon == float("inf")  # check_ping rejects it with its usual reason


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"location": {}}',
        b'{"location": {"coords": {"latitude": "x", "longitude": 1}}, "device_id": "a"}',
        b'{"location": {"coords": {"latitude": 1, "longitude": 1}}, "device_id": 7}',
        b'{"location": {"coords": {"latitude": 1, "longitude": 1}}, "device_id": "\xff"}',
        b'{"extras": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"location": {"coords": {"latitude": 1e999999, "longitude": 1}}, "device_id": "a"}',
    ],
)
def test_decode_json_refuses_garbage_with_400(body: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_json(body, now=NOW)


def test_decode_json_without_any_device_id_is_400() -> None:
    with pytest.raises(BadRequest, match="no device id"):
        decode_json(TRACCAR_CLIENT_JSON.replace(b',"device_id":"48241179"', b""), now=NOW)


def test_parse_timestamp_forms() -> None:
    assert parse_timestamp("1377177267", now=NOW) == 1377177267
    assert parse_timestamp(1442068686579, now=NOW) == pytest.approx(1442068686.579)
    assert parse_timestamp("2016-01-27T20:55:47+02:00", now=NOW) == 1453920947
    assert parse_timestamp("", now=NOW) == NOW
    with pytest.raises(BadRequest):
        parse_timestamp("inf", now=NOW)
