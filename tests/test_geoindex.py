"""The geo-index on its own: publishing by tick, cell moves, order, staleness, removal."""

from __future__ import annotations

import h3.api.basic_int as h3i

from tracker.client import FeedView
from tracker.geoindex import GeoIndex
from tracker.pings import Ping
from tracker.wire import decode_frame, decode_vids, iter_moves, iter_positions

RES = 7
A = h3i.latlng_to_cell(52.52, 13.405, RES)
B = next(c for c in h3i.grid_disk(A, 1) if c != A)
A_POINT, B_POINT = h3i.cell_to_latlng(A), h3i.cell_to_latlng(B)


def _index(**overrides: float) -> GeoIndex:
    settings = {"stale_after_s": 10.0, "remove_after_s": 20.0, **overrides}
    return GeoIndex(resolution=RES, forget_after_ticks=5, **settings)  # type: ignore[arg-type]


def _ping(vid: str, point: tuple[float, float], ts: float) -> Ping:
    return Ping(vehicle_id=vid, lat=point[0], lon=point[1], ts=ts)


def test_apply_is_invisible_until_the_next_tick() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    assert index.snapshot_frame(A) is None
    tick = index.advance(now=100.5)
    assert set(tick.frames) == {A}
    assert index.snapshot_frame(A) is not None


def test_apply_ignores_pings_not_newer_than_the_last_accepted() -> None:
    index = _index()
    assert index.apply(_ping("v", A_POINT, 100), now=100)
    assert not index.apply(_ping("v", B_POINT, 99), now=100)
    assert not index.apply(_ping("v", B_POINT, 100), now=100)
    index.advance(now=101)
    frame = decode_frame(index.snapshot_frame(A) or b"")
    assert [p.vid for p in iter_positions(frame)] == [1]
    assert index.snapshot_frame(B) is None


def test_advance_publishes_only_the_newest_ping_per_vehicle() -> None:
    index = _index()
    for ts in (100.0, 100.2, 100.4):
        index.apply(_ping("v", (A_POINT[0] + ts / 1e6, A_POINT[1]), ts), now=ts)
    (positions,) = [
        list(iter_positions(decode_frame(f))) for f in index.advance(101).frames.values()
    ]
    assert len(positions) == 1 and positions[0].ts == 100.4


def test_advance_moving_vehicle_is_gone_from_old_cell_and_named_in_new() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", B_POINT, 101), now=101)
    frames = {cell: decode_frame(f) for cell, f in index.advance(101.5).frames.items()}
    assert decode_vids(frames[A].gone) == (1,)
    assert frames[B].names == [(1, "v")]
    assert [p.vid for p in iter_positions(frames[B])] == [1]
    assert index.snapshot_frame(A) is None


def test_advance_same_cell_move_sends_no_name_again() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", (A_POINT[0] + 1e-4, A_POINT[1]), 101), now=101)
    tick = index.advance(101.5)
    frame = decode_frame(tick.frames[A])
    assert frame.names == [] and frame.gone == b""
    # Every subscriber of A has its previous position: it travels as an 8-byte move,
    # and the long form (for JSON) spells it out as a full record.
    assert frame.positions == b"" and len(frame.moves) == 8
    (move,) = iter_moves(frame)
    assert (move.vid, move.dlat, move.dlon) == (1, 10, 0)
    (full,) = iter_positions(decode_frame(tick.long[A]))
    assert full.lat == round(A_POINT[0] + 1e-4, 5)


def test_advance_entering_or_jumping_vehicles_get_full_records() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    (first,) = index.advance(100.5).frames.values()
    assert decode_frame(first).moves == b""
    index.apply(_ping("v", (A_POINT[0] + 3e-3, A_POINT[1]), 101), now=101)  # 330 m, same cell
    tick = index.advance(101.5)
    frame = decode_frame(tick.frames[A])
    assert frame.moves == b"" and len(frame.positions) == 12 and tick.long == {}


def test_advance_marks_silent_vehicles_stale_then_removes_them() -> None:
    index = _index(stale_after_s=10, remove_after_s=20)
    index.apply(_ping("quiet", A_POINT, 100), now=100)
    index.apply(_ping("chatty", B_POINT, 100), now=100)
    index.advance(100)
    index.apply(_ping("chatty", B_POINT, 109), now=109)
    index.advance(109)
    frames = index.advance(111).frames
    assert decode_vids(decode_frame(frames[A]).stale) == (1,)
    assert B not in frames
    assert index.stale_count == 1
    assert decode_frame(index.snapshot_frame(A) or b"").stale == (1).to_bytes(4, "little")
    frames = index.advance(121).frames
    assert decode_vids(decode_frame(frames[A]).removed) == (1,)
    assert index.vehicle_count == 1 and index.snapshot_frame(A) is None
    assert index.name_of(1) == "quiet"  # still nameable for replayed frames


def test_a_stale_vehicle_that_pings_again_is_fresh() -> None:
    index = _index(stale_after_s=10, remove_after_s=20)
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(111)
    assert index.stale_count == 1
    index.apply(_ping("v", A_POINT, 112), now=112)
    index.advance(112)
    assert index.stale_count == 0
    index.advance(125)  # would have been removed had it stayed silent
    assert index.vehicle_count == 1


def test_removed_names_are_forgotten_after_the_replay_window() -> None:
    index = _index(stale_after_s=1, remove_after_s=2)
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(103)
    for step in range(6):
        index.advance(104 + step)
    assert index.name_of(1) is None


def test_vids_are_never_reused() -> None:
    index = _index(stale_after_s=1, remove_after_s=2)
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(103)
    index.apply(_ping("v", A_POINT, 104), now=104)
    index.advance(104)
    assert index.name_of(2) == "v"


def test_frames_replayed_in_order_rebuild_the_snapshot() -> None:
    """Vehicles hopping between A and B and wandering inside them (moves)."""
    index = _index()
    live = FeedView()
    points = [A_POINT, B_POINT]
    moves = 0
    for step in range(12):
        for n in range(4):
            lat, lon = points[(step // 3 + n) % 2]
            point = (lat + step * 1e-5 * n, lon - step * 2e-5)
            index.apply(_ping(f"v{n}", point, 100 + step), now=100 + step)
        for frame in index.advance(100 + step + 0.5).frames.values():
            live.apply_frame(decode_frame(frame))
            moves += len(decode_frame(frame).moves) // 8
    assert moves > 10
    rebuilt = FeedView()
    for cell in (A, B):
        frame = index.snapshot_frame(cell)
        if frame:
            rebuilt.apply_frame(decode_frame(frame))
    assert rebuilt.vehicles == live.vehicles
    assert index.count_in([A, B]) == 4
