"""The per-tick frame step: index changes encoded as cell frames, moves, long forms, snapshots."""

from __future__ import annotations

import h3.api.basic_int as h3i

from tracker.client import FeedView
from tracker.frames import encode_snapshot, encode_tick
from tracker.geoindex import GeoIndex
from tracker.pings import Ping
from tracker.views import Watched
from tracker.wire import decode_frame, decode_vids, iter_moves, iter_positions

RES = 7
A = h3i.latlng_to_cell(52.52, 13.405, RES)
B = next(c for c in h3i.grid_disk(A, 1) if c != A)
C, D = [c for c in h3i.grid_disk(A, 1) if c not in (A, B)][:2]
FAR = h3i.latlng_to_cell(48.137, 11.575, RES)
A_POINT, B_POINT, FAR_POINT = (h3i.cell_to_latlng(c) for c in (A, B, FAR))


def _index() -> GeoIndex:
    return GeoIndex(resolution=RES, stale_after_s=10, remove_after_s=20, forget_after_ticks=5)


def _ping(vid: str, point: tuple[float, float], ts: float) -> Ping:
    return Ping(vehicle_id=vid, lat=point[0], lon=point[1], ts=ts)


def test_encode_tick_frames_every_changed_cell_in_the_index_order() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", B_POINT, 101), now=101)
    changes = index.advance(101.5)
    tick = encode_tick(changes)
    assert (tick.tick, tick.t_ms) == (2, 101_500)
    assert list(tick.frames) == changes.changed_cells() == [B, A]
    frames = {cell: decode_frame(data) for cell, data in tick.frames.items()}
    assert decode_vids(frames[A].gone) == (1,) and frames[A].positions == b""
    assert frames[B].names == [(1, "v")]
    assert [p.vid for p in iter_positions(frames[B])] == [1]
    assert all(f.t_ms == 101_500 for f in frames.values())


def test_encode_tick_same_cell_step_travels_as_a_move_with_a_long_form() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    (first,) = encode_tick(index.advance(100.5)).frames.values()
    assert decode_frame(first).moves == b""  # entering: a full record
    index.apply(_ping("v", (A_POINT[0] + 1e-4, A_POINT[1]), 101), now=101)
    tick = encode_tick(index.advance(101.5))
    frame = decode_frame(tick.frames[A])
    assert frame.names == [] and frame.gone == b""
    # Every subscriber of A has its previous position: it travels as an 8-byte move,
    # and the long form (for JSON) spells it out as a full record.
    assert frame.positions == b"" and len(frame.moves) == 8
    (move,) = iter_moves(frame)
    assert (move.vid, move.dlat, move.dlon) == (1, 10, 0)
    (full,) = iter_positions(decode_frame(tick.long[A]))
    assert full.lat == round(A_POINT[0] + 1e-4, 5)


def test_encode_tick_a_jump_too_long_for_a_move_is_a_full_record() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", (A_POINT[0] + 3e-3, A_POINT[1]), 101), now=101)  # 330 m, same cell
    tick = encode_tick(index.advance(101.5))
    frame = decode_frame(tick.frames[A])
    assert frame.moves == b"" and len(frame.positions) == 12 and tick.long == {}


def test_encode_tick_stale_and_removed_columns() -> None:
    index = _index()
    index.apply(_ping("quiet", A_POINT, 100), now=100)
    index.advance(100)
    stale = decode_frame(encode_tick(index.advance(111)).frames[A])
    assert decode_vids(stale.stale) == (1,)
    removed = decode_frame(encode_tick(index.advance(121)).frames[A])
    assert decode_vids(removed.removed) == (1,)


def test_encode_tick_of_a_quiet_tick_is_empty() -> None:
    tick = encode_tick(_index().advance(100))
    assert tick.frames == {} and tick.long == {}


def test_encode_snapshot_holds_every_vehicle_of_the_cell() -> None:
    index = _index()
    index.apply(_ping("a", A_POINT, 100), now=100)
    index.apply(_ping("b", (A_POINT[0] + 1e-3, A_POINT[1]), 100), now=100)
    index.advance(100.5)
    state = index.cell_state(A)
    assert state is not None
    frame = decode_frame(encode_snapshot(state))
    assert (frame.cell, frame.t_ms, frame.moves) == (A, 100_500, b"")
    assert sorted(frame.names) == [(1, "a"), (2, "b")]
    assert sorted(p.vid for p in iter_positions(frame)) == [1, 2]


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
        for frame in encode_tick(index.advance(100 + step + 0.5)).frames.values():
            live.apply_frame(decode_frame(frame))
            moves += len(decode_frame(frame).moves) // 8
    assert moves > 10
    rebuilt = FeedView()
    for cell in (A, B):
        state = index.cell_state(cell)
        if state:
            rebuilt.apply_frame(decode_frame(encode_snapshot(state)))
    assert rebuilt.vehicles == live.vehicles
    assert len(rebuilt.vehicles) == 4


def _spread_ticks(only: frozenset[int]) -> list[tuple[dict[int, bytes], dict[int, bytes]]]:
    """Vehicles hopping between A and B and wandering about C, D and far away: each
    tick's frames with ``only`` set, and without."""
    index = _index()
    cells = [A, B, C, D]
    made = []
    for step in range(8):
        ts = 100.0 + step
        for n in range(12):
            lat, lon = h3i.cell_to_latlng(cells[(step // 2 + n) % 4])
            index.apply(_ping(f"v{n}", (lat + n * 1e-5, lon + step * 1e-5), ts), now=ts)
        index.apply(_ping("far", (FAR_POINT[0], FAR_POINT[1] + step * 1e-4), ts), now=ts)
        changes = index.advance(100 + step + 0.5)
        made.append((encode_tick(changes).frames, encode_tick(changes, only=only).frames))
    return made


def test_encode_tick_only_frames_the_given_cells_with_the_same_bytes() -> None:
    only = frozenset({A, D})
    for every, some in _spread_ticks(only):
        assert set(some) == set(every) & only  # membership-only cells (gone) included
        assert all(some[cell] == every[cell] for cell in some)
    assert all(some == {} for _, some in _spread_ticks(frozenset()))


def test_encode_tick_only_still_frames_watched_views_anywhere() -> None:
    """A followed vehicle and a watched fleet key in cells no area feed watches still get
    their frames: ``only`` drops rows no frame needs, not theirs."""
    index = GeoIndex(resolution=RES, stale_after_s=10, remove_after_s=20)
    for n, point in enumerate((A_POINT, B_POINT, B_POINT)):
        index.apply(_ping(f"v{n}", point, 100), now=100)
    index.advance(100.5)
    for n, point in enumerate((A_POINT, B_POINT, B_POINT)):
        index.apply(_ping(f"v{n}", (point[0] + 1e-4, point[1]), 101), now=101)
    followed = index.vehicle("v0")
    assert followed is not None
    watched = Watched(
        fleet_keys=frozenset({(B, "default")}),
        vehicles={followed.vid: "v0"},
        json_keys=frozenset({"v0", (B, "default")}),
    )
    changes = index.advance(101.5)
    fleet_of = index.fleet_of_vid
    every = encode_tick(changes, watched, fleet_of)
    some = encode_tick(changes, watched, fleet_of, only=frozenset())
    assert some.frames == {} and every.frames.keys() == {A, B}
    assert some.views.keys() == every.views.keys() == {"v0", (B, "default")}
    for key, frames in every.views.items():
        assert [(f.cell, f.data, f.long) for f in some.views[key]] == [
            (f.cell, f.data, f.long) for f in frames
        ]
    (fleet_frame,) = some.views[(B, "default")]
    assert len(decode_frame(fleet_frame.data).moves) == 16  # both of B's vehicles
