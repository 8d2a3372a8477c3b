"""The OwnTracks decoder on messages written from the OwnTracks JSON documentation."""

from __future__ import annotations

import pytest

from tracker.devices.owntracks import KMH_M_S, decode_message, device_from_topic, message_type
from tracker.errors import BadRequest

# As the app publishes them (booklet: JSON, "location" and friends).
LOCATION = (
    b'{"_type":"location","acc":13,"alt":34,"batt":41,"bs":1,"conn":"w","created_at":1497476450,'
    b'"lat":48.85833,"lon":2.29513,"m":1,"t":"u","tid":"JJ","tst":1497476456,"vac":0,"vel":36,'
    b'"cog":271,"topic":"owntracks/jane/phone"}'
)
TRANSITION = (
    b'{"_type":"transition","wtst":1497476000,"lat":48.85,"lon":2.29,"tst":1497476456,'
    b'"acc":10,"tid":"JJ","event":"enter","desc":"Home","t":"c"}'
)
LWT = b'{"_type":"lwt","tst":1497476456}'


def test_decode_message_maps_a_location() -> None:
    ping = decode_message(LOCATION, "jane/phone")
    assert ping is not None
    assert (ping.vehicle_id, ping.lat, ping.lon, ping.ts) == (
        "jane/phone",
        48.85833,
        2.29513,
        1497476456,
    )
    assert ping.speed == pytest.approx(36 * KMH_M_S)  # km/h in, m/s in the ping
    assert ping.heading == 271


def test_decode_message_skips_other_types() -> None:
    assert decode_message(TRANSITION, "jane/phone") is None
    assert decode_message(LWT, "jane/phone") is None
    assert decode_message(b'{"_type":"encrypted","data":"abc"}', "jane/phone") is None
    assert message_type(b"{}") == ""


def test_decode_message_minimal_location_and_unknown_speed() -> None:
    ping = decode_message(b'{"_type":"location","lat":1,"lon":2,"tst":3,"vel":-1}', "a/b")
    assert ping is not None and ping.speed is None and ping.heading is None


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b"null",
        b'{"_type":"location"}',
        b'{"_type":"location","lat":"48","lon":2,"tst":1}',
        b'{"_type":"location","lat":48,"lon":2,"tst":"yesterday"}',
        b'{"_type":"location","lat":1e99999,"lon":2,"tst":1}',
        b'{"_type":"\xff"}',
        b'{"_type":"location","lat":1,"lon":2,"tst":1,"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"_type":7}',
    ],
)
def test_decode_message_refuses_garbage_with_400(payload: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_message(payload, "a/b")


def test_device_from_topic() -> None:
    assert device_from_topic("owntracks/jane/phone") == "jane/phone"
    assert device_from_topic("fleet/eu/owntracks/jane/phone") == "jane/phone"
    for bad in ("owntracks/jane", "owntracks//phone", "owntracks/jane/", "x/" + "y" * 70 + "/z"):
        with pytest.raises(BadRequest):
            device_from_topic(bad)
