"""Pins the bus message of docs/wire-format.md ("Bus messages") byte for byte."""

from __future__ import annotations

import msgspec
import pytest

from tracker.wire import (
    BUS_VERSION,
    BusMessage,
    BusPing,
    decode_bus_message,
    decode_bus_ping,
    encode_bus_message,
    encode_bus_ping,
)

ORIGIN = b"\x01\x02\x03\x04\x05\x06\x07\x08"
PING = BusPing("van-17", 52.52, 13.405, 1_764_000_000.5, 12.5, None)


def test_a_message_is_an_array_of_version_origin_and_pings() -> None:
    encoded = encode_bus_message(ORIGIN, [PING])
    assert msgspec.msgpack.decode(encoded) == [
        1,
        ORIGIN,
        [["van-17", 52.52, 13.405, 1_764_000_000.5, 12.5, None]],
    ]
    assert encoded[:3] == b"\x93\x01\xc4"  # fixarray(3), version 1, bin8 origin
    assert BUS_VERSION == 1
    assert decode_bus_message(encoded) == BusMessage(1, ORIGIN, [PING])


def test_a_state_entry_is_the_six_element_ping() -> None:
    encoded = encode_bus_ping(PING)
    assert encoded == msgspec.msgpack.encode(["van-17", 52.52, 13.405, 1_764_000_000.5, 12.5, None])
    assert decode_bus_ping(encoded) == PING


def test_a_future_version_is_read_by_its_known_prefix() -> None:
    """Version 9 appended a field to each ping and two to the message."""
    future = msgspec.msgpack.encode(
        [9, ORIGIN, [["van-17", 52.52, 13.405, 1_764_000_000.5, 12.5, None, "extra", {}]], 1, "x"]
    )
    assert decode_bus_message(future) == BusMessage(9, ORIGIN, [PING])


def test_the_unversioned_format_reads_as_version_0() -> None:
    legacy = msgspec.msgpack.encode(
        [ORIGIN, [["van-17", 52.52, 13.405, 1_764_000_000.5, 12.5, None]]]
    )
    assert decode_bus_message(legacy) == BusMessage(0, ORIGIN, [PING])


@pytest.mark.parametrize(
    "message",
    [
        [1, ORIGIN],  # no pings
        [1, ORIGIN, [["van", "52.5", 13.4, 1.0, None, None]]],  # a string latitude
        [1, ORIGIN, [["", 52.5, 13.4, 1.0, None, None]]],  # empty id
        [1, ORIGIN, [["x" * 65, 52.5, 13.4, 1.0, None, None]]],  # id too long
        [1, ORIGIN, [["van", 52.5, 13.4]]],  # a ping too short
        ["1", ORIGIN, []],  # version not an int
        {"version": 1},
        "text",
    ],
)
def test_what_does_not_decode_raises_decode_error(message: object) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_bus_message(msgspec.msgpack.encode(message))


def test_bytes_that_are_not_msgpack_raise_decode_error() -> None:
    for data in (b"", b"\xc1", b"\x93\x01"):
        with pytest.raises(msgspec.DecodeError):
            decode_bus_message(data)
