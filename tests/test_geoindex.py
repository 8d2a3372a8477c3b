"""The geo-index on its own: publishing by tick, cell moves, order, staleness, removal.

The index returns plain records (what changed per cell, what a cell holds); encoding them
is tested in tests/test_frames.py.
"""

from __future__ import annotations

import math

import h3.api.basic_int as h3i

from tracker.geoindex import GeoIndex
from tracker.pings import Ping

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
    assert index.cell_state(A) is None
    tick = index.advance(now=100.5)
    assert (tick.tick, tick.t_ms, set(tick.cells)) == (1, 100_500, {A})
    state = index.cell_state(A)
    assert state is not None and state.names == [(1, "v")] and state.t_ms == 100_500


def test_apply_ignores_pings_not_newer_than_the_last_accepted() -> None:
    index = _index()
    assert index.apply(_ping("v", A_POINT, 100), now=100)
    assert not index.apply(_ping("v", B_POINT, 99), now=100)
    assert not index.apply(_ping("v", B_POINT, 100), now=100)
    index.advance(now=101)
    state = index.cell_state(A)
    assert state is not None and [p.vid for p in state.positions] == [1]
    assert index.cell_state(B) is None


def test_advance_publishes_only_the_newest_ping_per_vehicle() -> None:
    index = _index()
    for ts in (100.0, 100.2, 100.4):
        index.apply(_ping("v", (A_POINT[0] + ts / 1e6, A_POINT[1]), ts), now=ts)
    (change,) = index.advance(101).cells.values()
    assert change.positions.ts.tolist() == [100.4]


def test_advance_moving_vehicle_is_gone_from_old_cell_and_named_in_new() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", B_POINT, 101), now=101)
    cells = index.advance(101.5).cells
    assert cells[A].gone == [1] and len(cells[A].positions.vid) == 0
    assert cells[B].names == [(1, "v")]
    assert cells[B].positions.vid.tolist() == [1]
    assert all(math.isnan(x) for x in cells[B].previous[0])  # entered: no previous position
    assert index.cell_state(A) is None


def test_advance_same_cell_move_lists_the_previous_position_and_no_name() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", (A_POINT[0] + 1e-4, A_POINT[1]), 101), now=101)
    change = index.advance(101.5).cells[A]
    assert change.names == [] and change.gone == []
    assert change.previous.tolist() == [list(A_POINT)]
    assert change.positions.lat.tolist() == [A_POINT[0] + 1e-4]


def test_advance_lists_positions_of_a_cell_in_applied_order() -> None:
    index = _index()
    for n, vid in enumerate(("c", "a", "b")):
        index.apply(_ping(vid, (A_POINT[0] + n * 1e-5, A_POINT[1]), 100), now=100)
    index.apply(_ping("elsewhere", B_POINT, 100), now=100)
    cells = index.advance(100.5).cells
    assert cells[A].positions.vid.tolist() == [1, 2, 3]
    assert [name for _, name in cells[A].names] == ["c", "a", "b"]
    assert cells[B].positions.vid.tolist() == [4]


def test_advance_marks_silent_vehicles_stale_then_removes_them() -> None:
    index = _index(stale_after_s=10, remove_after_s=20)
    index.apply(_ping("quiet", A_POINT, 100), now=100)
    index.apply(_ping("chatty", B_POINT, 100), now=100)
    index.advance(100)
    index.apply(_ping("chatty", B_POINT, 109), now=109)
    index.advance(109)
    cells = index.advance(111).cells
    assert cells[A].stale == [1]
    assert B not in cells
    assert index.stale_count == 1
    state = index.cell_state(A)
    assert state is not None and state.stale == [1]
    cells = index.advance(121).cells
    assert cells[A].removed == [1]
    assert index.vehicle_count == 1 and index.cell_state(A) is None
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


def test_advance_with_nothing_pending_changes_nothing() -> None:
    index = _index()
    assert index.advance(100).cells == {}
    assert index.tick == 1


def test_advance_reports_the_published_pings_timestamps() -> None:
    index = _index()
    index.apply(_ping("a", A_POINT, 100), now=100)
    index.apply(_ping("b", B_POINT, 99.5), now=100)
    assert sorted(index.advance(100.5).ping_ts.tolist()) == [99.5, 100]
    assert index.advance(101).ping_ts.tolist() == []


def test_vehicle_reads_the_latest_accepted_state() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    vehicle = index.vehicle("v")
    assert vehicle is not None and vehicle.pending is not None and vehicle.last_ts == 100
    index.advance(100.5)
    assert vehicle.pending is None and vehicle.cell == A
    assert index.vehicle("nobody") is None


def test_a_publication_prepared_in_slices_publishes_what_was_pending_when_taken() -> None:
    """Between slices the published state is unchanged (a snapshot sees the last tick), and
    a ping applied meanwhile waits for the next tick."""
    index = _index()
    index.apply(_ping("a", A_POINT, 100), now=100)
    index.advance(100.5)
    for n, point in enumerate([B_POINT, A_POINT, B_POINT]):
        index.apply(_ping(f"v{n}", point, 101), now=101)
    index.apply(_ping("a", (A_POINT[0] + 1e-4, A_POINT[1]), 101), now=101)
    publication = index.take_pending()
    assert publication.prepare(2)
    index.apply(_ping("a", B_POINT, 102), now=102)  # after the take: the next tick's
    state = index.cell_state(A)
    assert state is not None and state.names == [(1, "a")] and index.cell_state(B) is None
    while publication.prepare(2):
        assert index.cell_state(B) is None
    tick = index.advance(102.5, publication)
    assert set(tick.cells) == {A, B}
    assert tick.cells[A].positions.vid.tolist() == [3, 1]  # v1, then a, as applied
    assert tick.cells[A].previous[1].tolist() == [A_POINT[0], A_POINT[1]]  # a stayed in A
    assert tick.cells[B].positions.vid.tolist() == [2, 4] and tick.cells[B].names
    following = index.advance(103)
    assert following.cells[B].names == [(1, "a")] and following.cells[A].gone == [1]


def test_advance_in_one_go_and_in_slices_agree() -> None:
    def run(slice_size: int | None) -> list[tuple[int, list[int], list[float | None], list[int]]]:
        index = _index()
        for n in range(50):
            point = (A_POINT, B_POINT)[n % 2]
            index.apply(_ping(f"v{n}", (point[0] + n * 1e-6, point[1]), 100), now=100)
        index.advance(100.5)
        for n in range(50):
            point = (A_POINT, B_POINT)[n % 3 % 2]
            index.apply(_ping(f"v{n}", (point[0] + n * 2e-6, point[1]), 101), now=101)
        publication = index.take_pending()
        while slice_size and publication.prepare(slice_size):
            pass
        tick = index.advance(101.5, publication)
        return [
            (cell, c.positions.vid.tolist(), [_nan_as_none(x) for x in c.previous.ravel()], c.gone)
            for cell, c in tick.cells.items()
        ]

    whole = run(None)
    assert run(7) == whole and run(1) == whole


def _nan_as_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
