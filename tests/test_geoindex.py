"""The geo-index on its own: publishing by tick, cell moves, order, staleness, removal.

The index returns plain records (what changed per cell, what a cell holds); encoding them
is tested in tests/test_frames.py.
"""

from __future__ import annotations

import math

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt

from tracker.geoindex import NO_DISC, CellDisks, CellRuns, GeoIndex
from tracker.pings import Ping
from tracker.wire import Position, PositionColumns

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
    assert (tick.tick, tick.t_ms, tick.changed_cells()) == (1, 100_500, [A])
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
    tick = index.advance(101)
    assert tick.changed_cells() == [A]
    assert tick.moved.of(A)[0].ts.tolist() == [100.4]


def test_advance_moving_vehicle_is_gone_from_old_cell_and_named_in_new() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", B_POINT, 101), now=101)
    tick = index.advance(101.5)
    assert tick.cells[A].gone == [1] and len(tick.moved.of(A)[0].vid) == 0
    assert tick.cells[B].names == [(1, "v")]
    positions, previous = tick.moved.of(B)
    assert positions.vid.tolist() == [1]
    assert all(math.isnan(x) for x in previous[0])  # entered: no previous position
    assert index.cell_state(A) is None


def test_advance_same_cell_move_lists_the_previous_position_and_no_name() -> None:
    index = _index()
    index.apply(_ping("v", A_POINT, 100), now=100)
    index.advance(100.5)
    index.apply(_ping("v", (A_POINT[0] + 1e-4, A_POINT[1]), 101), now=101)
    tick = index.advance(101.5)
    assert tick.cells == {} and tick.changed_cells() == [A]  # no name, nothing gone
    positions, previous = tick.moved.of(A)
    assert previous.tolist() == [list(A_POINT)]
    assert positions.lat.tolist() == [A_POINT[0] + 1e-4]


def test_advance_lists_positions_of_a_cell_in_applied_order() -> None:
    index = _index()
    for n, vid in enumerate(("c", "a", "b")):
        index.apply(_ping(vid, (A_POINT[0] + n * 1e-5, A_POINT[1]), 100), now=100)
    index.apply(_ping("elsewhere", B_POINT, 100), now=100)
    tick = index.advance(100.5)
    assert tick.moved.of(A)[0].vid.tolist() == [1, 2, 3]
    assert [name for _, name in tick.cells[A].names] == ["c", "a", "b"]
    assert tick.moved.of(B)[0].vid.tolist() == [4]


def test_advance_marks_silent_vehicles_stale_then_removes_them() -> None:
    index = _index(stale_after_s=10, remove_after_s=20)
    index.apply(_ping("quiet", A_POINT, 100), now=100)
    index.apply(_ping("chatty", B_POINT, 100), now=100)
    index.advance(100)
    index.apply(_ping("chatty", B_POINT, 109), now=109)
    index.advance(109)
    tick = index.advance(111)
    assert tick.cells[A].stale == [1]
    assert tick.changed_cells() == [A]
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
    tick = index.advance(100)
    assert tick.cells == {} and tick.changed_cells() == [] and len(tick.moved) == 0
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
    assert vehicle is not None and index.pending(vehicle) is not None and vehicle.last_ts == 100
    publication = index.take_pending()
    assert index.pending(vehicle) is None  # taken: the tick publishes it
    index.apply(_ping("v", A_POINT, 101), now=101)
    assert index.pending(vehicle) == _ping("v", A_POINT, 101)  # the next tick's
    index.advance(100.5, publication)
    assert index.pending(vehicle) is not None and vehicle.cell == A
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
    assert set(tick.changed_cells()) == {A, B}
    positions, previous = tick.moved.of(A)
    assert positions.vid.tolist() == [3, 1]  # v1, then a, as applied
    assert previous[1].tolist() == [A_POINT[0], A_POINT[1]]  # a stayed in A
    assert tick.moved.of(B)[0].vid.tolist() == [2, 4] and tick.cells[B].names
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
        moved = tick.moved
        return [
            (
                cell,
                moved.of(cell)[0].vid.tolist(),
                [_nan_as_none(x) for x in moved.of(cell)[1].ravel()],
                tick.cells[cell].gone if cell in tick.cells else [],
            )
            for cell in tick.changed_cells()
        ]

    whole = run(None)
    assert run(7) == whole and run(1) == whole


def test_cell_runs_are_the_rows_of_each_cell_in_order_and_select_keeps_some() -> None:
    first, second = sorted((A, B))
    far = max(A, B) + 1  # a cell number with no rows
    positions = PositionColumns.of(
        Position(vid, 52.0, 13.0 + vid, 100.0 + vid, None, None) for vid in (7, 3, 5)
    )
    previous = np.array([[1.0, 2.0], [math.nan, math.nan], [3.0, 4.0]])
    runs = CellRuns(np.array([first, first, second], dtype=np.uint64), positions, previous)
    assert runs.runs() == {first: slice(0, 2), second: slice(2, 3)}
    assert list(runs.runs()) == [first, second]  # ascending
    vids, before = runs.of(first)
    assert vids.vid.tolist() == [7, 3] and before[0].tolist() == [1.0, 2.0]
    assert len(runs.of(far)[0].vid) == 0 and runs.of(far)[1].shape == (0, 2)
    kept = runs.select(np.array([False, True, True]))
    assert len(kept) == 2 and kept.runs() == {first: slice(0, 1), second: slice(1, 2)}
    assert kept.of(second)[0].ts.tolist() == [105.0] and kept.of(second)[1].tolist() == [[3, 4]]
    assert CellRuns().runs() == {} and len(CellRuns().select(np.zeros(0, dtype=bool))) == 0


def test_a_spread_tick_lists_each_changed_cell_once() -> None:
    """Many vehicles over many cells: the runs hold every position once, by cell, and the
    changed cells are the runs' cells and the cells left (no cell twice)."""
    index = _index()
    rng = np.random.default_rng(3)
    lat, lon = 52 + rng.uniform(-0.5, 0.5, 2000), 13 + rng.uniform(-0.5, 0.5, 2000)
    for n in range(2000):
        index.apply(_ping(f"v{n}", (lat[n], lon[n]), 100), now=100)
    first = index.advance(100.5)
    assert len(first.moved) == 2000 and len(first.moved.runs()) == len(first.cells)
    for n in range(2000):
        index.apply(_ping(f"v{n}", (lat[n] + 0.01, lon[n]), 101), now=101)
    tick = index.advance(101.5)
    changed = tick.changed_cells()
    assert len(changed) == len(set(changed)) == len(set(tick.moved.runs()) | set(tick.cells))
    cells = [h3i.latlng_to_cell(a + 0.01, o, RES) for a, o in zip(lat, lon, strict=True)]
    assert sorted(cells) == tick.moved.cells.tolist()


def _nan_as_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _random_points(rng: np.random.Generator, count: int) -> npt.NDArray[np.float64]:
    """Points anywhere between 85 degrees south and north, poles and antimeridian included
    (more of them near those edges than an even spread would give)."""
    lat = np.concatenate([rng.uniform(-85, 85, count), rng.uniform(75, 85, count // 4)])
    lon = np.concatenate([rng.uniform(-180, 180, count), rng.uniform(179, 180, count // 4)])
    return np.column_stack((lat, lon))


def _discs_of(discs: CellDisks, cells: list[int]) -> npt.NDArray[np.float64]:
    return np.array([discs.disc(cell) for cell in cells], dtype=np.float64).reshape(-1, 4)


def test_cell_discs_never_keep_a_point_that_left_its_cell() -> None:
    """Whatever the resolution and wherever on Earth: a point said to be in its old cell
    is in it by H3; points that left it (or near an edge) are left to H3."""
    rng = np.random.default_rng(7)
    for resolution in (7, 8, 9, 10):
        discs = CellDisks()
        starts = _random_points(rng, 400)
        cells = [h3i.latlng_to_cell(lat, lon, resolution) for lat, lon in starts.tolist()]
        edge_km = h3i.average_hexagon_edge_length(resolution, unit="km")
        step_deg = 1.5 * edge_km / 111.0  # steps up to 1.5 edges: many leave the cell
        for _ in range(20):
            moved = starts + rng.normal(0, step_deg / 2, starts.shape)
            moved[:, 0] = moved[:, 0].clip(-89.9, 89.9)
            inside = discs.inside(_discs_of(discs, cells), moved[:, 0], moved[:, 1])
            truth = [h3i.latlng_to_cell(la, lo, resolution) for la, lo in moved.tolist()]
            kept = np.flatnonzero(inside)
            assert all(truth[row] == cells[row] for row in kept.tolist())
            assert len(kept) > 0
        assert not discs.inside(_discs_of(discs, [0, 0, 0]), starts[:3, 0], starts[:3, 1]).any()


def test_a_cells_own_centre_is_inside_its_disc_except_near_poles() -> None:
    cells = [h3i.latlng_to_cell(lat, 13.4, 7) for lat in (-79.0, 0.0, 52.5, 79.0, 84.0)]
    centres = np.array([h3i.cell_to_latlng(cell) for cell in cells])
    inside = CellDisks.inside(_discs_of(CellDisks(), cells), centres[:, 0], centres[:, 1])
    assert inside.tolist() == [True, True, True, True, False]


def test_a_vehicles_row_keeps_the_disc_of_its_published_cell_and_a_reused_row_none() -> None:
    """The disc on a vehicle's row is what says a ping stayed in its cell without H3: it
    must be its published cell's, and a new vehicle on a removed one's row has none (a
    stale disc would keep its first ping in cell 0)."""
    index = _index()
    index.apply(_ping("old", A_POINT, 100), now=100)
    index.advance(100.5)
    old = index.vehicle("old")
    assert old is not None
    table, discs = old.table, CellDisks()
    assert table.disc[old.slot].tolist() == list(discs.disc(A))
    index.apply(_ping("old", B_POINT, 101), now=101)
    index.advance(101.5)
    assert old.cell == B and table.disc[old.slot].tolist() == list(discs.disc(B))
    index.advance(125)  # removed
    index.apply(_ping("new", B_POINT, 126), now=126)  # on the old row, in its old cell's disc
    assert table.disc[0].tolist() == list(NO_DISC)
    index.advance(126.5)
    new = index.vehicle("new")
    assert new is not None and new.slot == 0 and new.cell == B
    state = index.cell_state(B)
    assert state is not None and state.names == [(new.vid, "new")]


def test_published_rows_of_removed_vehicles_are_reused_without_mixing_them_up() -> None:
    index = _index()
    index.apply(_ping("old", A_POINT, 100), now=100)
    index.advance(100.5)
    gone = index.vehicle("old")
    index.advance(125)  # removed (remove_after_s 20)
    assert index.vehicle("old") is None and gone is not None and gone.published is None
    index.apply(Ping(vehicle_id="new", lat=B_POINT[0], lon=B_POINT[1], ts=126, speed=3.5), 126)
    index.advance(126.5)
    new = index.vehicle("new")
    assert new is not None and new.slot == 0  # the old vehicle's row
    assert new.published == Position(new.vid, B_POINT[0], B_POINT[1], 126.0, 3.5, None)
    state = index.cell_state(B)
    assert state is not None and state.positions == [new.published]


def test_published_columns_grow_past_their_first_rows() -> None:
    index = _index()
    count = 3000
    for n in range(count):
        index.apply(_ping(f"v{n}", (A_POINT[0] + n * 1e-7, A_POINT[1]), 100), now=100)
    index.advance(100.5)
    last = index.vehicle(f"v{count - 1}")
    assert last is not None and last.published is not None
    assert last.published.lat == A_POINT[0] + (count - 1) * 1e-7
    state = index.cell_state(A)
    assert state is not None and len(state.positions) == count
