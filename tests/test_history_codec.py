"""tracker.history.codec: blobs give back exactly the quantised positions, whatever they hold."""

from __future__ import annotations

import math
import zlib

import h3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.history import codec, layout
from tracker.history.codec import Positions
from tracker.pings import Ping

NAN = float("nan")


def quantised(positions: Positions) -> Positions:
    """What a blob keeps of ``positions``: the fixed-point units of the format."""
    speed = np.where(np.isnan(positions.speed), NAN, np.round(positions.speed * 10) / 10)
    heading = np.where(np.isnan(positions.heading), NAN, np.round(positions.heading))
    return Positions(
        positions.vehicle,
        np.round(positions.ts * 1000) / 1000,
        np.round(positions.lat * 1e6) / 1e6,
        np.round(positions.lon * 1e6) / 1e6,
        speed,
        heading,
        positions.cell,
    )


def assert_same(got: Positions, want: Positions) -> None:
    assert len(got) == len(want)
    for name, a, b in zip(Positions._fields, got, want, strict=True):
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def roundtrip(positions: Positions) -> Positions:
    return codec.decode(codec.encode(positions))


def test_encode_decode_round_trips_a_track_with_unknown_speed_and_heading() -> None:
    positions = Positions.from_columns(
        [7, 7, 7, 7],
        [1_700_000_000.0, 1_700_000_001.0, 1_700_000_002.5, 1_700_000_002.5],
        [52.520001, 52.520011, 52.520031, 52.52005],
        [13.405, 13.40502, 13.40499, 13.405],
        [NAN, 12.3, 0.0, NAN],
        [90.0, NAN, 359.0, 360.0],
    )
    back = roundtrip(positions)
    assert_same(back, quantised(positions))
    assert math.isnan(back.speed[0]) and math.isnan(back.heading[1])


def test_encode_decode_empty() -> None:
    assert_same(roundtrip(Positions.empty()), Positions.empty())


def test_encode_decode_single_position() -> None:
    one = Positions.from_columns([0], [0.0], [-89.999999], [-180.0], [0.0], [0.0])
    assert_same(roundtrip(one), one)


def test_encode_decode_extreme_values_and_large_deltas() -> None:
    positions = Positions.from_columns(
        [0, 2**62, -(2**62), 0],
        [-codec.TS_MAX_S, codec.TS_MAX_S, 0.0, -1.0],
        [90.0, -90.0, 90.0, 0.0],
        [180.0, -180.0, 180.0, -180.0],
        [0.0, 1e300, 0.04, 0.05],
        [0.0, 360.0, 0.4, 359.6],
    )
    back = roundtrip(positions)
    assert back.speed[1] == codec.SPEED_MAX / 10  # saturated, not wrapped
    np.testing.assert_array_equal(back.speed[[0, 2]], [0.0, 0.0])
    np.testing.assert_array_equal(back.heading, [0.0, 360.0, 0.0, 360.0])
    np.testing.assert_array_equal(back.vehicle, positions.vehicle)
    np.testing.assert_array_equal(back.ts, positions.ts)
    np.testing.assert_array_equal(back.lat, positions.lat)


def test_encode_decode_across_the_antimeridian() -> None:
    lon = np.array([179.999_998, 179.999_999, -180.0, -179.999_999, 179.5, -179.5])
    positions = Positions.from_columns(
        np.zeros(6), np.arange(6.0), np.zeros(6), lon, *[np.zeros(6)] * 2
    )
    np.testing.assert_array_equal(roundtrip(positions).lon, lon)


def test_encode_decode_keeps_every_bit_of_h3_cells() -> None:
    cells = [
        h3.str_to_int(h3.latlng_to_cell(lat, lon, 15)) for lat, lon in ((85, 179), (-85, -179))
    ]
    cells += [2**64 - 1, 0, 2**63]
    positions = Positions.from_columns(np.zeros(5), np.zeros(5), *[np.zeros(5)] * 4)
    positions = Positions(*positions[:-1], np.array(cells, dtype=np.uint64))
    np.testing.assert_array_equal(roundtrip(positions).cell, positions.cell)


@pytest.mark.parametrize(
    ("column", "value"),
    [("ts", NAN), ("ts", math.inf), ("ts", 1e300), ("lat", 90.5), ("lat", NAN), ("lon", -180.1)],
)
def test_encode_refuses_what_it_cannot_keep(column: str, value: float) -> None:
    columns = {name: [0.0] for name in ("ts", "lat", "lon", "speed", "heading")}
    columns[column] = [value]
    with pytest.raises(ValueError, match=column):
        codec.encode(Positions.from_columns([0], **columns))


def test_encode_refuses_columns_of_different_lengths() -> None:
    positions = Positions.from_columns([0, 1], [0.0], [0.0], [0.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="lengths"):
        codec.encode(positions)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"TH",
        b"XX\x01\x01\x00\x00\x00\x00" + zlib.compress(b""),
        b"TH\x02\x01\x00\x00\x00\x00" + zlib.compress(b""),
        b"TH\x01\x09\x00\x00\x00\x00" + zlib.compress(b""),
        b"TH\x01\x01\x05\x00\x00\x00not zlib",
        b"TH\x01\x01\x05\x00\x00\x00" + zlib.compress(b"\x00" * 200),
    ],
)
def test_decode_refuses_what_is_not_a_blob(blob: bytes) -> None:
    with pytest.raises(ValueError, match="blob"):
        codec.decode(blob)


def test_decode_refuses_a_truncated_or_lying_blob() -> None:
    blob = codec.encode(
        Positions.from_columns(np.zeros(100), np.arange(100.0), *[np.zeros(100)] * 4)
    )
    body = zlib.decompress(blob[8:])
    for damaged in (body[:-10], body[:50]):
        with pytest.raises(ValueError, match="damaged"):
            codec.decode(blob[:8] + zlib.compress(damaged))
    lying_count = blob[:4] + (101).to_bytes(4, "little") + blob[8:]
    with pytest.raises(ValueError, match="damaged"):
        codec.decode(lying_count)


def test_from_pings_takes_missing_speed_and_heading_as_unknown() -> None:
    pings = [
        Ping(vehicle_id="a", lat=1.0, lon=2.0, ts=3.0),
        Ping(vehicle_id="b", lat=4.0, lon=5.0, ts=6.0, speed=7.0, heading=8.0),
    ]
    positions = Positions.from_pings(pings, [10, 11])
    np.testing.assert_array_equal(positions.vehicle, [10, 11])
    np.testing.assert_array_equal(positions.speed, [NAN, 7.0])
    np.testing.assert_array_equal(positions.heading, [NAN, 8.0])
    np.testing.assert_array_equal(positions.cell, [0, 0])


def test_sorted_orders_by_vehicle_then_time_stably() -> None:
    positions = Positions.from_columns(
        [2, 1, 2, 1, 1], [5.0, 9.0, 1.0, 9.0, 2.0], *[np.arange(5.0)] * 4
    )
    ordered = positions.sorted()
    np.testing.assert_array_equal(ordered.vehicle, [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(ordered.ts, [2.0, 9.0, 9.0, 1.0, 5.0])
    np.testing.assert_array_equal(ordered.lat, [4.0, 1.0, 3.0, 2.0, 0.0])


def test_groups_splits_by_vehicle_and_bucket() -> None:
    positions = Positions.from_columns(
        [1, 1, 1, 2], [3599.0, 3600.0, 7300.0, 10.0], *[np.zeros(4)] * 4
    ).sorted()
    groups = [(vehicle, bucket, len(part)) for vehicle, bucket, part in positions.groups(3600)]
    assert groups == [(1, 0, 1), (1, 1, 1), (1, 2, 1), (2, 0, 1)]
    assert list(Positions.empty().groups(3600)) == []


def test_with_cells_matches_h3() -> None:
    positions = Positions.from_columns(
        [0, 0], [0.0, 1.0], [52.52, -33.9], [13.4, 151.2], [0.0] * 2, [0.0] * 2
    )
    cells = positions.with_cells(7).cell
    assert [h3.int_to_str(int(c)) for c in cells] == [
        h3.latlng_to_cell(52.52, 13.4, 7),
        h3.latlng_to_cell(-33.9, 151.2, 7),
    ]


def test_a_fleet_track_compresses_below_the_size_target() -> None:
    """A vehicle driving at 1 Hz with GPS noise: a few bytes per position, not 8."""
    rng = np.random.default_rng(1)
    n = 3600
    lat = 52.5 + np.cumsum(rng.normal(0, 5e-5, n)) + rng.normal(0, 4e-5, n)
    lon = 13.4 + np.cumsum(rng.normal(0, 5e-5, n)) + rng.normal(0, 4e-5, n)
    speed = np.clip(10 + np.cumsum(rng.normal(0, 0.3, n)), 0, None)
    heading = np.round(np.cumsum(rng.normal(0, 2, n))) % 360
    ts = 1_700_000_000 + np.arange(n) * 1.0 + rng.uniform(0, 0.05, n)
    positions = Positions.from_columns(np.full(n, 5), ts, lat, lon, speed, heading).with_cells(7)
    assert len(codec.encode(positions)) / n < 6


finite_lat = st.floats(-90, 90, allow_nan=False)
finite_lon = st.floats(-180, 180, allow_nan=False)
maybe = st.one_of(st.just(NAN), st.floats(0, 1e6, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-(2**40), 2**40),
            st.floats(-1e10, 1e10, allow_nan=False),
            finite_lat,
            finite_lon,
            maybe,
            st.one_of(st.just(NAN), st.floats(0, 360, allow_nan=False)),
            st.integers(0, 2**64 - 1),
        ),
        max_size=50,
    )
)
def test_encode_decode_property(
    rows: list[tuple[int, float, float, float, float, float, int]],
) -> None:
    columns = list(zip(*rows, strict=True)) if rows else [[]] * 7
    positions = Positions.from_columns(*columns[:6])
    positions = Positions(*positions[:-1], np.array(columns[6], dtype=np.uint64))
    assert_same(roundtrip(positions), quantised(positions))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.floats(-1e9, 1e9, allow_nan=False),
            finite_lat,
            finite_lon,
            maybe,
            st.one_of(st.just(NAN), st.floats(0, 360, allow_nan=False)),
            st.integers(0, 2**64 - 1),
        ),
        min_size=1,
        max_size=60,
    ),
    st.lists(st.integers(1, 59), max_size=5),
)
def test_encode_groups_makes_the_blobs_encode_makes(
    rows: list[tuple[int, float, float, float, float, float, int]], cuts: list[int]
) -> None:
    """One pass over many groups (of one vehicle or several): byte for byte what
    encode() makes of each."""
    columns = list(zip(*rows, strict=True))
    positions = Positions.from_columns(*columns[:6])
    positions = Positions(*positions[:-1], np.array(columns[6], dtype=np.uint64)).sorted()
    starts = np.union1d([0], [cut for cut in cuts if cut < len(positions)]).astype(np.intp)
    ends = [*starts[1:].tolist(), len(positions)]
    expected = [
        codec.encode(positions.take(slice(lo, hi)))
        for lo, hi in zip(starts.tolist(), ends, strict=True)
    ]
    assert codec.encode_groups(positions, starts) == expected


def test_segments_are_the_groups_of_a_compaction_encoded_one_by_one() -> None:
    raw = [
        Positions.from_columns(
            [2, 1, 1, 2],
            [7300.0, 3599.0, 3600.5, 10.0],
            [52.5, 52.6, 48.1, 52.5],
            [13.4] * 4,
            [1.0, NAN, 2.0, 3.0],
            [NAN, 4.0, 5.0, 6.0],
        ),
        Positions.from_columns([1], [3601.0], [52.7], [13.5], [NAN], [NAN]),
    ]
    got = layout.segments(raw, 7)
    merged = Positions.concat(raw).sorted().with_cells(7)
    want_blobs = [codec.encode(part) for _, _, part in merged.groups(layout.BUCKET_S)]
    assert [chunk.blob for chunk in got] == want_blobs
    assert layout.seal([codec.decode(chunk.blob) for chunk in reversed(got)]) == got
    assert [(c.vehicle, c.bucket, c.size) for c in got] == [
        (1, 0, 1),
        (1, 1, 2),
        (2, 0, 1),
        (2, 2, 1),
    ]
    assert layout.segments([], 7) == []


def test_decode_many_is_decode_of_each() -> None:
    rng = np.random.default_rng(7)
    parts = []
    for n in (0, 1, 5, 300, 0, 2000):
        positions = Positions.from_columns(
            np.sort(rng.integers(0, 5, n)),
            np.sort(rng.uniform(1e9, 2e9, n)),
            rng.uniform(-90, 90, n),
            rng.uniform(-180, 180, n),
            np.where(rng.random(n) < 0.5, NAN, rng.uniform(0, 1e5, n)),
            np.where(rng.random(n) < 0.5, NAN, rng.uniform(0, 360, n)),
        )
        parts.append(Positions(*positions[:-1], rng.integers(0, 2**63, n).astype(np.uint64)))
    blobs = [codec.encode(part) for part in parts]
    for got, part in zip(codec.decode_many(blobs), parts, strict=True):
        assert_same(got, quantised(part))
    assert codec.decode_many([]) == []
    with pytest.raises(ValueError, match="damaged"):
        codec.decode_many([*blobs[:2], blobs[2][:-3]])
