"""What every history store does, whatever keeps it: one contract, run against each.

Each test gets a new, migrated store: SQLite in a new file in the test's temporary
directory, and PostgreSQL in a new database on the private server
(tests/postgres_server.py). Store-specific behaviour (connections, files, several
instances, migrations) is tested in each store's own module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import h3.api.basic_int as h3i
import msgspec
import numpy as np
import pytest

from tracker.history.decoded import DecodedChunks
from tracker.history.postgres import PostgresStore
from tracker.history.sqlite import SqliteStore
from tracker.history.store import HistoryStore, RejectedPings, Track
from tracker.pings import Ping

T0 = 1_764_000_000.0
"""A bucket boundary (a whole hour), so tests know which hour each ping is in."""
HOUR = 3600.0
BERLIN = (52.52, 13.405)
MUNICH = (48.137, 11.575)
RESOLUTION = 7
FOREVER = 1e12
"""Far beyond any ping here."""


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[HistoryStore]:
    """A new, migrated store of each kind."""
    kept: HistoryStore
    if request.param == "sqlite":
        kept = SqliteStore(request.getfixturevalue("tmp_path") / "h.sqlite3", RESOLUTION)
    else:
        kept = PostgresStore(request.getfixturevalue("postgres"), resolution=RESOLUTION)
    kept.migrate()
    try:
        yield kept
    finally:
        kept.close()


def drive(
    vehicle_id: str,
    start: float,
    count: int,
    *,
    step_s: float = 1.0,
    origin: tuple[float, float] = BERLIN,
    north_per_step: float = 1e-4,
) -> list[Ping]:
    """``count`` pings of a vehicle driving north from ``origin``, one every ``step_s``."""
    lat, lon = origin
    return [
        Ping(
            vehicle_id=vehicle_id,
            lat=lat + i * north_per_step,
            lon=lon,
            ts=start + i * step_s,
            speed=11.1 if i % 3 else None,
            heading=0.0 if i % 5 else None,
        )
        for i in range(count)
    ]


def assert_track_is(track: Track, pings: list[Ping]) -> None:
    """``track`` holds exactly ``pings`` (in the order given), to the units kept."""
    assert len(track) == len(pings), (len(track), len(pings))
    assert np.all(np.diff(track.ts) >= 0)
    np.testing.assert_allclose(track.ts, [p.ts for p in pings], atol=5e-4, rtol=0)
    np.testing.assert_allclose(track.lat, [p.lat for p in pings], atol=1e-6, rtol=0)
    np.testing.assert_allclose(track.lon, [p.lon for p in pings], atol=1e-6, rtol=0)
    speeds = [math.nan if p.speed is None else p.speed for p in pings]
    np.testing.assert_allclose(track.speed, speeds, atol=0.05, rtol=0)
    headings = [math.nan if p.heading is None else p.heading for p in pings]
    np.testing.assert_allclose(track.heading, headings, atol=0.5, rtol=0)


def cells_around(lat: float, lon: float, rings: int = 30) -> set[int]:
    return set(h3i.grid_disk(h3i.latlng_to_cell(lat, lon, RESOLUTION), rings))


def whole_area(store: HistoryStore, cells: set[int], *, limit: int) -> dict[str, Track]:
    """Every page of an area query, joined per vehicle; checks the pages' order."""
    joined: dict[str, list[Track]] = {}
    after: tuple[str, float] | None = None
    last: tuple[str, float] | None = None
    for _ in range(10_000):
        page = store.area(cells, T0 - HOUR, T0 + 10 * HOUR, limit=limit, after=after)
        assert sum(len(track) for track in page.tracks) <= limit
        for track in page.tracks:
            assert len(track) > 0
            first = (track.vehicle_id, float(track.ts[0]))
            assert last is None or first > last, "pages out of order or overlapping"
            last = (track.vehicle_id, float(track.ts[-1]))
            joined.setdefault(track.vehicle_id, []).append(track)
        if page.cursor is None:
            break
        assert page.cursor == last
        after = page.cursor
    return {vehicle: _join(parts) for vehicle, parts in joined.items()}


def _join(parts: list[Track]) -> Track:
    columns = [np.concatenate(column) for column in list(zip(*parts, strict=True))[1:]]
    return Track(parts[0].vehicle_id, *columns)


def test_track_returns_what_was_appended_in_time_order(store: HistoryStore) -> None:
    pings = drive("van-12", T0, 100)
    store.append(pings[50:])
    store.append(pings[:50])
    assert_track_is(store.track("van-12", T0, FOREVER, limit=1000), pings)


def test_track_of_a_vehicle_never_seen_is_empty(store: HistoryStore) -> None:
    store.append(drive("van-12", T0, 10))
    assert len(store.track("van-13", T0, FOREVER, limit=1000)) == 0


def test_track_keeps_to_its_window_start_included_end_excluded(store: HistoryStore) -> None:
    pings = drive("van-12", T0, 100)
    store.append(pings)
    assert_track_is(store.track("van-12", T0 + 10, T0 + 20, limit=1000), pings[10:20])


def test_track_keeps_only_its_vehicle(store: HistoryStore) -> None:
    van, truck = drive("van", T0, 30), drive("truck", T0, 30, origin=MUNICH)
    store.append([p for pair in zip(van, truck, strict=True) for p in pair])
    assert_track_is(store.track("truck", T0, FOREVER, limit=1000), truck)


def test_track_pages_by_limit_and_after_return_every_position_once(
    store: HistoryStore,
) -> None:
    pings = drive("van-12", T0 - 30, 7200, step_s=1.0)  # three hours' buckets
    store.append(pings[:5000])
    store.compact(T0 + HOUR)
    store.append(pings[5000:])
    pages: list[Track] = []
    after = None
    while True:
        page = store.track("van-12", T0 - HOUR, FOREVER, limit=999, after=after)
        if not len(page):
            break
        assert len(page) <= 999
        pages.append(page)
        after = float(page.ts[-1])
    assert_track_is(_join(pages), pings)


def test_compact_keeps_every_position_and_merges_into_existing_chunks(
    store: HistoryStore,
) -> None:
    pings = drive("van-12", T0, 600) + drive("truck", T0, 600, origin=MUNICH)
    store.append(pings[:300])
    assert store.compact(FOREVER) == 300
    store.append(pings[300:])
    assert store.compact(T0 + 100) == 0, "a batch with newer positions is not compacted"
    assert store.compact(FOREVER) == 900
    assert store.compact(FOREVER) == 0
    assert_track_is(store.track("van-12", T0, FOREVER, limit=10_000), pings[:600])
    assert_track_is(store.track("truck", T0, FOREVER, limit=10_000), pings[600:])
    assert store.stats().positions == 1200


def test_area_returns_the_vehicles_in_its_cells_ordered_by_id(store: HistoryStore) -> None:
    store.append(
        drive("b-van", T0, 20) + drive("a-van", T0, 20) + drive("munich", T0, 20, origin=MUNICH)
    )
    page = store.area(cells_around(*BERLIN), T0, FOREVER, limit=1000)
    assert page.cursor is None
    assert [track.vehicle_id for track in page.tracks] == ["a-van", "b-van"]
    assert_track_is(page.tracks[0], drive("a-van", T0, 20))


def test_area_keeps_only_positions_inside_its_cells_and_window(store: HistoryStore) -> None:
    # 1e-3 degrees north per step: leaves the one cell around the start after a while.
    pings = drive("van", T0, 200, north_per_step=1e-3)
    start_cell = h3i.latlng_to_cell(*BERLIN, RESOLUTION)
    inside = [p for p in pings if h3i.latlng_to_cell(p.lat, p.lon, RESOLUTION) == start_cell]
    assert 0 < len(inside) < 100
    for compacted in (False, True):
        if compacted:
            store.compact(FOREVER)
        else:
            store.append(pings)
        (track,) = store.area({start_cell}, T0, FOREVER, limit=1000).tracks
        assert_track_is(track, inside)
        (track,) = store.area({start_cell}, T0 + 1, T0 + 3, limit=1000).tracks
        assert_track_is(track, inside[1:3])


@pytest.mark.parametrize("limit", [1, 7, 10_000])
def test_area_pages_return_every_position_once_in_order(store: HistoryStore, limit: int) -> None:
    fleet = {f"v{n:02}": drive(f"v{n:02}", T0 + n, 10 + 3 * n) for n in range(6)}
    pings = [p for track in fleet.values() for p in track]
    store.append(pings[::2])
    store.compact(FOREVER)
    store.append(pings[1::2])
    found = whole_area(store, cells_around(*BERLIN), limit=limit)
    assert sorted(found) == sorted(fleet)
    for vehicle, track in found.items():
        assert_track_is(track, fleet[vehicle])


def test_area_of_no_cells_or_an_empty_window_is_empty(store: HistoryStore) -> None:
    store.append(drive("van", T0, 20))
    assert store.area(set(), T0, FOREVER, limit=10).tracks == []
    assert store.area(cells_around(*BERLIN), T0 + 100, FOREVER, limit=10).tracks == []


def test_expire_deletes_in_small_steps_only_what_is_entirely_older(store: HistoryStore) -> None:
    for hour in range(5):
        store.append(drive("van", T0 + hour * HOUR, 10) + drive("bus", T0 + hour * HOUR, 10))
    store.compact(T0 + 3 * HOUR)  # hours 0-2 in chunks, 3-4 still raw batches
    steps = []
    while removed := store.expire(T0 + 4 * HOUR, limit=2):
        assert removed <= 2
        steps.append(removed)
    # Six chunks of hours 0-2; hour 3's raw batches, one per vehicle shard (van and bus
    # are numbered 1 and 2: two shards).
    assert sum(steps) == 6 + 2
    track = store.track("van", 0, FOREVER, limit=1000)
    assert_track_is(track, drive("van", T0 + 4 * HOUR, 10))
    assert store.stats().positions == 20


def test_stats_counts_positions_and_bytes(store: HistoryStore) -> None:
    empty = store.stats()
    assert empty.positions == 0
    store.append(drive("van", T0, 500))
    store.append(drive("bus", T0, 500))
    store.compact(FOREVER)
    stats = store.stats()
    assert stats.positions == 1000
    assert stats.bytes_on_disk > 0


def test_migrate_twice_changes_nothing(store: HistoryStore) -> None:
    store.append(drive("van", T0, 10))
    store.migrate()
    assert len(store.track("van", T0, FOREVER, limit=100)) == 10


def test_compaction_appends_segments_and_seals_a_bucket_once_it_is_over(
    store: HistoryStore,
) -> None:
    """Each compaction appends its positions to the chunk as a segment (a late ping too);
    once the hour is over its segments are merged into one, and nothing moves or doubles."""
    van = drive("van", T0, 3000)
    for minute in range(0, 3000, 600):
        store.append(van[minute : minute + 600])
        store.compact(T0 + minute + 600)
        assert_track_is(store.track("van", T0, FOREVER, limit=10_000), van[: minute + 600])
    late = drive("van", T0 + 0.5, 1, origin=(52.0, 13.0))
    store.append(late)
    store.compact(T0 + HOUR - 1)  # the hour is not over: still segments
    assert segments(store, "van") == 6
    store.compact(T0 + HOUR)
    assert segments(store, "van") == 1
    expected = sorted(van + late, key=lambda ping: ping.ts)
    assert_track_is(store.track("van", T0, FOREVER, limit=10_000), expected)
    found = whole_area(store, cells_around(52.0, 13.0, rings=1), limit=100)
    assert_track_is(found["van"], late)
    assert store.stats().positions == 3001


def segments(store: HistoryStore, vehicle_id: str) -> int:
    """How many segments the store keeps for ``vehicle_id``'s chunks."""
    if isinstance(store, SqliteStore):
        with store._database.snapshot() as connection:
            (count,) = connection.execute(
                "SELECT count(*) FROM chunks JOIN vehicles ON id = vehicle WHERE name = ?",
                (vehicle_id,),
            ).fetchone()
    else:
        assert isinstance(store, PostgresStore)
        with store._database.snapshot() as connection:
            row = connection.execute(
                """SELECT count(*) FROM history_chunks JOIN history_vehicles ON id = vehicle
                   WHERE name = %s""",
                (vehicle_id,),
            ).fetchone()
            assert row is not None
            (count,) = row
    return int(count)


def test_compact_and_expire_take_infinity_for_everything(store: HistoryStore) -> None:
    store.append(drive("van", T0, 100))
    assert store.compact(math.inf) == 100
    assert store.compact(-math.inf) == 0
    assert segments(store, "van") == 1
    assert store.expire(-math.inf, limit=10) == 0
    assert store.expire(math.inf, limit=10) == 1
    assert store.stats().positions == 0
    with pytest.raises(ValueError, match="NaN"):
        store.compact(math.nan)


def test_a_track_reads_only_its_vehicles_shard_of_raw_batches(store: HistoryStore) -> None:
    """Raw batches are cut by vehicle shard: every vehicle of a fleet reads back its own."""
    fleet = {f"v{n}": drive(f"v{n}", T0, 30, origin=(52.0 + n / 100, 13.0)) for n in range(150)}
    for second in range(30):
        store.append([pings[second] for pings in fleet.values()])
    for name in ("v0", "v63", "v64", "v149"):
        assert_track_is(store.track(name, T0, FOREVER, limit=100), fleet[name])
    assert store.stats().positions == 150 * 30


def test_pings_it_cannot_keep_are_refused_for_good_and_kept_aside(store: HistoryStore) -> None:
    bad = [Ping(vehicle_id="van", lat=91.0, lon=13.0, ts=T0)]  # past the pole: no encoding
    with pytest.raises(RejectedPings, match="cannot keep"):
        store.append(drive("van", T0, 5) + bad)
    assert store.stats().positions == 0  # nothing of the refused commit
    store.reject(bad, "lat 91.0 is not within +-90")
    if isinstance(store, SqliteStore):
        with store._database.snapshot() as connection:
            rows = connection.execute("SELECT reason, pings FROM rejected").fetchall()
    else:
        assert isinstance(store, PostgresStore)
        with store._database.snapshot() as connection:
            rows = connection.execute("SELECT reason, pings FROM history_rejected").fetchall()
    ((reason, blob),) = rows
    assert "91.0" in reason
    assert msgspec.msgpack.decode(bytes(blob), type=list[Ping]) == bad
    store.append(drive("van", T0, 5))  # the store goes on


def test_decoded_chunks_kept_by_content_never_answer_stale(store: HistoryStore) -> None:
    """With a budget (as in reader processes), what compaction, sealing and retention
    change is read as changed: a chunk is kept by its bytes, and changed bytes are
    another chunk."""
    store.decoded = DecodedChunks(64 * 1024 * 1024)
    pings = drive("van", T0, 100, step_s=72)  # hours 0 and 1 (50 pings each)
    store.append(pings)
    store.compact(FOREVER)  # both hours sealed
    assert_track_is(store.track("van", T0, FOREVER, limit=1000), pings)
    kept = len(store.decoded)
    assert kept == 2
    assert_track_is(store.track("van", T0, FOREVER, limit=1000), pings)  # from the kept
    assert len(store.decoded) == kept
    late = Ping(vehicle_id="van", lat=BERLIN[0], lon=BERLIN[1], ts=T0 + 15, speed=1.0, heading=2.0)
    store.append([late])
    store.compact(FOREVER)  # hour 0 appended to, then sealed again: new bytes
    with_late = sorted([*pings, late], key=lambda ping: ping.ts)
    assert_track_is(store.track("van", T0, FOREVER, limit=1000), with_late)
    cells = cells_around(*BERLIN)
    assert_track_is(whole_area(store, cells, limit=1000)["van"], with_late)
    while store.expire(T0 + HOUR, limit=10):  # hour 0 past retention
        pass
    assert_track_is(store.track("van", T0, FOREVER, limit=1000), pings[50:])
    assert_track_is(whole_area(store, cells, limit=1000)["van"], pings[50:])
