"""Continuation cursors: round trips, and every forged or foreign one refused with 400."""

from __future__ import annotations

import base64

import msgspec
import pytest

from tracker.errors import BadRequest
from tracker.history.cursor import (
    MAX_CURSOR_CHARS,
    bind_query,
    decode_area_cursor,
    decode_track_cursor,
    encode_cursor,
)

START, END = 1_764_000_000.0, 1_764_086_400.0
TRACK = bind_query("track", b"van-12", START, END)
AREA = bind_query("area", b"\x01\x02", START, END)


def _raw(*fields: object) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(list(fields))).rstrip(b"=").decode()


def test_cursors_round_trip() -> None:
    track = encode_cursor(TRACK, START + 12.345)
    area = encode_cursor(AREA, START + 1, "van-12")
    assert decode_track_cursor(track, TRACK, start=START, end=END) == START + 12.345
    assert decode_area_cursor(area, AREA, start=START, end=END) == ("van-12", START + 1)
    assert track.isascii() and "=" not in track and len(area) < 80


def test_a_cursor_is_bound_to_its_query() -> None:
    other_window = bind_query("track", b"van-12", START, END - 1)
    other_vehicle = bind_query("track", b"van-13", START, END)
    cursor = encode_cursor(TRACK, START + 1)
    for binding in (other_window, other_vehicle, AREA):
        with pytest.raises(BadRequest, match="another query"):
            decode_track_cursor(cursor, binding, start=START, end=END)


@pytest.mark.parametrize(
    ("cursor", "words"),
    [
        ("", "does not decode"),
        ("!!!!", "does not decode"),
        ("é", "does not decode"),
        ("\udcff", "does not decode"),
        ("A" * (MAX_CURSOR_CHARS + 1), "longer than"),
        (_raw(1, b"x"), "does not decode"),
        (_raw(1, TRACK, 1.0, None, "extra"), "does not decode"),
        (_raw(1, TRACK, "1", None), "does not decode"),
        (_raw(2, TRACK, START, None), "another version"),
        (_raw(1, TRACK, float("nan"), None), "outside the window"),
        (_raw(1, TRACK, float("inf"), None), "outside the window"),
        (_raw(1, TRACK, END, None), "outside the window"),
        (_raw(1, TRACK, START - 1, None), "outside the window"),
        (_raw(1, TRACK, START, "van-12"), "area query"),
        (base64.urlsafe_b64encode(b"\xd9\x02\xff\xfe").decode(), "does not decode"),
    ],
)
def test_forged_track_cursors_are_400(cursor: str, words: str) -> None:
    with pytest.raises(BadRequest, match=words) as refused:
        decode_track_cursor(cursor, TRACK, start=START, end=END)
    assert refused.value.details == {"param": "cursor"}


@pytest.mark.parametrize(
    ("cursor", "words"),
    [
        (_raw(1, AREA, START, None), "cursor of a track"),
        (_raw(1, AREA, START, ""), "not one"),
        (_raw(1, AREA, START, "v" * 65), "not one"),
    ],
)
def test_forged_area_cursors_are_400(cursor: str, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        decode_area_cursor(cursor, AREA, start=START, end=END)
