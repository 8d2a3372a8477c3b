"""Pins the wire format of docs/wire-format.md byte for byte."""

from __future__ import annotations

import base64
import json
import math
import struct

import h3.api.basic_int as h3i
import msgspec
import numpy as np
import pytest

from tracker.client import FeedView
from tracker.pings import decode_pings
from tracker.wire import (
    LATLON_SCALE,
    MAX_ABS_LAT,
    MAX_MOVE_VID,
    MOVE,
    RECORD,
    CellFrame,
    Position,
    PositionColumns,
    cell_origin,
    decode_frame,
    decode_vids,
    encode_frame,
    frame_to_json,
    iter_moves,
    iter_positions,
    moved,
    pack_moves,
    pack_records,
)

CELL = h3i.latlng_to_cell(52.52, 13.405, 7)
T_MS = 1_764_000_000_000


def test_encode_frame_layout_is_a_ten_element_msgpack_array() -> None:
    data = encode_frame(
        CELL,
        T_MS,
        positions=[Position(7, 52.52, 13.405, T_MS / 1000 - 1.5, 10.0, 90.0)],
        names=[(7, "van-7")],
        gone=[3],
        stale=[4, 5],
        removed=[6],
    )
    raw = msgspec.msgpack.decode(data)
    assert data[0] == 0x9A  # fixarray of 10
    cell, t_ms, lat0, lon0, positions, names, gone, stale, removed, moves = raw
    assert moves == b""
    assert (cell, t_ms) == (CELL, T_MS)
    assert (lat0, lon0) == cell_origin(CELL)
    assert names == [[7, "van-7"]]
    assert gone == struct.pack("<I", 3) and stale == struct.pack("<2I", 4, 5)
    assert removed == struct.pack("<I", 6)
    assert len(positions) == RECORD.size == 12
    vid, dlat, dlon, age, speed, heading = struct.unpack("<IhhHBB", positions)
    assert vid == 7
    assert lat0 + dlat == round(52.52 * LATLON_SCALE)
    assert lon0 + dlon == round(13.405 * LATLON_SCALE)
    assert (age, speed, heading) == (15, 20, 45)


def test_encode_frame_unknown_speed_and_heading_are_255() -> None:
    data = encode_frame(CELL, T_MS, positions=[Position(1, 52.52, 13.405, T_MS / 1000, None, None)])
    record = msgspec.msgpack.decode(data)[4]
    assert record[-2:] == b"\xff\xff"
    (position,) = iter_positions(decode_frame(data))
    assert position.speed is None and position.heading is None


def test_encode_frame_clamps_age_and_speed_and_wraps_heading() -> None:
    data = encode_frame(
        CELL, T_MS, positions=[Position(1, 52.52, 13.405, T_MS / 1000 - 10_000, 500.0, 359.9)]
    )
    (position,) = iter_positions(decode_frame(data))
    assert position.ts == pytest.approx(T_MS / 1000 - 6553.5)
    assert position.speed == 127.0
    assert position.heading == 0.0


def test_position_costs_16_base64_bytes() -> None:
    one = encode_frame(CELL, T_MS, positions=[Position(1, 52.52, 13.405, T_MS / 1000, 1, 1)])
    many = encode_frame(
        CELL, T_MS, positions=[Position(i, 52.52, 13.405, T_MS / 1000, 1, 1) for i in range(1, 301)]
    )
    per_position = (len(base64.b64encode(many)) - len(base64.b64encode(one))) / 299
    assert per_position == pytest.approx(16, abs=0.1)


def test_decode_frame_rejects_a_truncated_frame() -> None:
    data = encode_frame(CELL, T_MS, positions=[Position(1, 52.52, 13.405, T_MS / 1000, 1, 1)])
    with pytest.raises(msgspec.DecodeError):
        decode_frame(data[:-3])


def test_offsets_fit_int16_at_every_served_resolution_and_latitude() -> None:
    for res in range(7, 11):
        for lat in (-MAX_ABS_LAT, -60.0, 0.0, 45.0, 70.0, MAX_ABS_LAT):
            for lon in range(-180, 180, 20):
                cell = h3i.latlng_to_cell(lat, lon, res)
                for vlat, vlon in h3i.cell_to_boundary(cell):
                    frame = encode_frame(cell, T_MS, positions=[Position(1, vlat, vlon, 0, 0, 0)])
                    (p,) = iter_positions(decode_frame(frame))
                    assert abs(p.lat - vlat) <= 1e-5
                    assert abs(((p.lon - vlon + 180) % 360) - 180) <= 1e-5


def test_frame_on_the_antimeridian_round_trips() -> None:
    cell = h3i.latlng_to_cell(-17.0, 179.999, 7)
    points = [(-17.0, 179.999), (-17.0, -179.999)]
    points = [p for p in points if h3i.latlng_to_cell(*p, 7) == cell] or points[:1]
    frame = encode_frame(cell, T_MS, positions=[Position(1, *points[0], 0, 0, 0)])
    (p,) = iter_positions(decode_frame(frame))
    assert p.lon == pytest.approx(points[0][1], abs=1e-5)


def test_frame_to_json_names_vehicles() -> None:
    data = encode_frame(
        CELL,
        T_MS,
        positions=[Position(1, 52.52, 13.405, T_MS / 1000, 2.0, None)],
        names=[(1, "a")],
        gone=[2],
    )
    doc = json.loads(frame_to_json(decode_frame(data), {2: "b"}.get))
    assert doc["cell"] == h3i.int_to_str(CELL)
    assert doc["vehicles"] == [
        {"id": "a", "lat": 52.52, "lon": 13.405, "ts": T_MS / 1000, "speed": 2.0, "heading": None}
    ]
    assert doc["gone"] == ["b"] and doc["stale"] == [] and doc["removed"] == []


def test_decode_vids_round_trip() -> None:
    assert decode_vids(struct.pack("<3I", 1, 2, 2**32 - 1)) == (1, 2, 2**32 - 1)


def test_feed_view_keeps_a_vehicle_moving_between_two_watched_cells() -> None:
    other = h3i.grid_disk(CELL, 1)[1]
    lat_b, lon_b = h3i.cell_to_latlng(other)
    enter_b = decode_frame(
        encode_frame(other, T_MS, positions=[Position(1, lat_b, lon_b, 0, 0, 0)], names=[(1, "v")])
    )
    leave_a = decode_frame(encode_frame(CELL, T_MS, gone=[1]))
    for order in ([enter_b, leave_a], [leave_a, enter_b]):
        view = FeedView()
        view.apply_frame(
            decode_frame(
                encode_frame(
                    CELL, T_MS, positions=[Position(1, 52.52, 13.405, 0, 0, 0)], names=[(1, "v")]
                )
            )
        )
        for frame in order:
            view.apply_frame(frame)
        assert view.by_id()["v"].cell == other


def test_feed_view_drops_a_vehicle_that_left_for_an_unwatched_cell() -> None:
    view = FeedView()
    view.apply_frame(
        decode_frame(
            encode_frame(
                CELL, T_MS, positions=[Position(1, 52.52, 13.405, 0, 0, 0)], names=[(1, "v")]
            )
        )
    )
    view.apply_frame(decode_frame(encode_frame(CELL, T_MS, gone=[1])))
    assert view.vehicles == {}


def test_feed_view_snapshot_replaces_and_marks_stale() -> None:
    view = FeedView()
    view.apply(
        "batch",
        base64.b64encode(
            encode_frame(
                CELL, T_MS, positions=[Position(9, 52.52, 13.405, 0, 0, 0)], names=[(9, "old")]
            )
        ).decode(),
    )
    snapshot = encode_frame(
        CELL, T_MS, positions=[Position(1, 52.52, 13.405, 0, 0, 0)], names=[(1, "v")], stale=[1]
    )
    view.apply("snapshot", base64.b64encode(snapshot).decode())
    assert set(view.by_id()) == {"v"} and view.by_id()["v"].stale


def test_decode_pings_keeps_good_pings_and_reports_bad_ones() -> None:
    body = msgspec.msgpack.encode(
        [
            {"vehicle_id": "a", "lat": 1.0, "lon": 2.0, "ts": 3.0},
            {"vehicle_id": "b", "lat": "x", "lon": 2.0, "ts": 3.0},
            {"vehicle_id": "c", "lon": 2.0, "ts": 3.0},
            {"vehicle_id": "d", "lat": 1, "lon": 2, "ts": 3, "speed": 4, "extra": True},
        ]
    )
    pings, rejected = decode_pings(body, json=False)
    assert [p.vehicle_id if p else None for p in pings] == ["a", None, None, "d"]
    listed = rejected.listed()
    assert [r.index for r in listed] == [1, 2] and rejected.total == 2
    assert "ping.lat" in listed[0].error and "lat" in listed[1].error


def test_decode_pings_keeps_nan_for_the_range_check() -> None:
    body = msgspec.msgpack.encode([{"vehicle_id": "a", "lat": math.nan, "lon": 2.0, "ts": 3.0}])
    pings, _ = decode_pings(body, json=False)
    assert pings[0] is not None and math.isnan(pings[0].lat)


def test_cell_frame_is_array_like() -> None:
    assert CellFrame.__struct_config__.array_like


def _moves(
    now: list[Position], before: list[tuple[float, float]], t_ms: int = T_MS
) -> tuple[list[bool], bytes]:
    """Pack ``now`` against ``before`` in CELL: the fit mask, and the moves that fit."""
    columns = PositionColumns.of(now)
    lat0, lon0 = cell_origin(CELL)
    records = pack_records(columns, lat0, lon0, t_ms)
    previous = np.array(before, dtype=np.float64).reshape(-1, 2)
    fits, moves = pack_moves(columns, previous[:, 0], previous[:, 1], records)
    return fits.tolist(), moves[fits].tobytes()


def test_move_record_layout_is_eight_bytes() -> None:
    step = Position(0x123456, 52.52 + 5e-5, 13.405 - 3e-5, T_MS / 1000 - 1.5, 10.0, 90.0)
    fits, moves = _moves([step], [(52.52, 13.405)])
    assert fits == [True] and len(moves) == MOVE.size == 8
    vid, vid_hi, dlat, dlon, age, speed, heading = struct.unpack("<HBbbBBB", moves)
    assert (vid | vid_hi << 16, dlat, dlon) == (0x123456, 5, -3)
    assert (age, speed, heading) == (15, 20, 45)
    raw = msgspec.msgpack.decode(encode_frame(CELL, T_MS, moves=moves))
    assert raw[9] == moves
    (move,) = iter_moves(decode_frame(encode_frame(CELL, T_MS, moves=moves)))
    after = moved(Position(0x123456, 52.52, 13.405, 0, None, None), move)
    assert (after.lat, after.lon) == (52.52005, 13.40497)
    assert (after.ts, after.speed, after.heading) == (T_MS / 1000 - 1.5, 10.0, 90.0)


def test_only_small_recent_steps_of_known_vehicles_fit_a_move() -> None:
    t = T_MS / 1000
    cases = [
        (Position(1, 52.52 + 127e-5, 13.405 - 128e-5, t, None, None), (52.52, 13.405), True),
        (Position(2, 52.52 + 128e-5, 13.405, t, None, None), (52.52, 13.405), False),
        (Position(3, 52.52, 13.405, t, None, None), (math.nan, math.nan), False),  # entering
        (Position(4, 52.52, 13.405, t - 25.5, None, None), (52.52, 13.405), True),
        (Position(5, 52.52, 13.405, t - 25.6, None, None), (52.52, 13.405), False),
        (Position(MAX_MOVE_VID + 1, 52.52, 13.405, t, None, None), (52.52, 13.405), False),
    ]
    fits, _ = _moves([c[0] for c in cases], [c[1] for c in cases])
    assert fits == [c[2] for c in cases]


def test_moves_never_drift_from_the_encoded_positions() -> None:
    """A client applying a thousand moves lands where full records would put it."""
    rng = np.random.default_rng(7)
    lat, lon = 52.52, 13.405
    view = FeedView()
    view.apply_frame(
        decode_frame(encode_frame(CELL, T_MS, positions=[Position(9, lat, lon, 0, None, None)]))
    )
    for _ in range(1000):
        before = (lat, lon)
        lat += float(rng.uniform(-1e-3, 1e-3))
        lon += float(rng.uniform(-1e-3, 1e-3))
        now = Position(9, lat, lon, T_MS / 1000, 1.0, 2.0)
        fits, moves = _moves([now], [before])
        records = b"" if fits[0] else encode_frame(CELL, T_MS, positions=[now])
        frame = (
            decode_frame(records)
            if records
            else decode_frame(encode_frame(CELL, T_MS, moves=moves))
        )
        view.apply_frame(frame)
        (direct,) = iter_positions(decode_frame(encode_frame(CELL, T_MS, positions=[now])))
        assert view.vehicles[9].position == direct


def test_a_move_across_the_antimeridian_wraps() -> None:
    cell = h3i.latlng_to_cell(0.0, 180.0, 7)
    previous = Position(1, 0.0, 179.9999, 0, None, None)
    (move,) = iter_moves(
        decode_frame(encode_frame(cell, T_MS, moves=MOVE.pack(1, 0, 0, 20, 0, 255, 255)))
    )
    assert moved(previous, move).lon == pytest.approx(-179.9999)


def test_feed_view_ignores_a_move_of_an_unknown_vehicle() -> None:
    view = FeedView()
    view.apply_frame(decode_frame(encode_frame(CELL, T_MS, moves=MOVE.pack(5, 0, 1, 1, 0, 0, 0))))
    assert view.vehicles == {}
