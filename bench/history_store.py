"""``python -m bench.history store``: the history stores alone, on the simulator's fleet.

    python -m bench.history store --vehicles 2000 --seconds 3600

Drives the simulator's fleet (every vehicle pinging once a second) for ``--seconds`` and
appends each second's pings as one commit, straight into each contender, with the
tracker's background compaction (every ``COMPACT_EVERY_S`` simulated seconds, what is
older than ``COMPACT_AGE_S``) in between, then measures:

* append rate (pings/s; each commit is durable when append returns), and compaction;
* bytes on disk per position (files, write-ahead log included);
* a one-day track of one vehicle (86,400 positions; the fleet's first vehicle's hour
  repeated for 24 hours under another id), p50 and p99 over ``--queries`` runs;
* an area query over the fleet's hour: the cells around the city centre (first page of
  10,000 positions, and every page).

Contenders: :class:`~tracker.history.sqlite.SqliteStore` (our layout: raw batches, then
delta-encoded hourly chunks), and DuckDB with a plain table of one row per position in
fixed point (its own columnar compression), the obvious alternative the issue names.
Both get the same pings as :class:`~tracker.pings.Ping` lists, one commit per second.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Protocol

import h3.api.basic_int as h3i
import numpy as np

from bench.common import CITY
from simulator.fleet import Fleet, FleetConfig, PingBatch
from tracker.history.codec import Positions
from tracker.history.sqlite import SqliteStore
from tracker.history.writer import COMPACT_AGE_S, COMPACT_EVERY_S
from tracker.pings import Ping

START = 1_764_000_000.0
"""The fleet's first second: a whole hour, so that its hour is one chunk bucket."""
FOREVER = 1e12
"""Later than any ping here (compact everything)."""
DAY_VAN = "day-van"
AREA_PAGE = 10_000
AREA_RINGS = 1
"""The area: the H3 cell (resolution 7, ~5 km2) at the city centre and its neighbours."""


class Contender(Protocol):
    """One way of keeping history, as the benchmark drives it."""

    label: str

    def append(self, pings: list[Ping]) -> None: ...

    def maintain(self, now: float) -> None:
        """What the tracker does in the background every ``COMPACT_EVERY_S``."""

    def settle(self) -> None:
        """Whatever the contender does after the writes (compaction, checkpoint)."""

    def track(self, vehicle_id: str, start: float, end: float) -> int: ...

    def area(self, cells: set[int], start: float, end: float, limit: int) -> int: ...

    def bytes_on_disk(self) -> int: ...

    def close(self) -> None: ...


class SqliteContender:
    """Our embedded store, through the HistoryStore interface the tracker uses."""

    label = "sqlite"

    def __init__(self, directory: str) -> None:
        self.store = SqliteStore(os.path.join(directory, "history.sqlite3"))
        self.store.migrate()

    def append(self, pings: list[Ping]) -> None:
        self.store.append(pings)

    def maintain(self, now: float) -> None:
        self.store.compact(now - COMPACT_AGE_S)

    def settle(self) -> None:
        self.store.compact(FOREVER)

    def track(self, vehicle_id: str, start: float, end: float) -> int:
        return len(self.store.track(vehicle_id, start, end, limit=100_000))

    def area(self, cells: set[int], start: float, end: float, limit: int) -> int:
        found, after = 0, None
        while True:
            page = self.store.area(cells, start, end, limit=min(limit, AREA_PAGE), after=after)
            found += sum(len(track) for track in page.tracks)
            if page.cursor is None or found >= limit:
                return found
            after = page.cursor

    def bytes_on_disk(self) -> int:
        return self.store.stats().bytes_on_disk

    def close(self) -> None:
        self.store.close()


class DuckdbContender:
    """DuckDB: one row per position, fixed-point columns, its columnar compression.

    Cells are computed on append (DuckDB's h3 extension cannot be downloaded here, and an
    area query needs them); speed and heading are NULL when unknown.
    """

    label = "duckdb"

    def __init__(self, directory: str) -> None:
        import duckdb

        self.path = os.path.join(directory, "history.duckdb")
        self.db = duckdb.connect(self.path)
        self.db.execute(
            """CREATE TABLE positions (
                   vehicle VARCHAR NOT NULL, ts BIGINT NOT NULL,
                   lat INTEGER NOT NULL, lon INTEGER NOT NULL,
                   speed SMALLINT, heading SMALLINT, cell UBIGINT NOT NULL)"""
        )

    def append(self, pings: list[Ping]) -> None:
        columns = Positions.from_pings(pings, np.zeros(len(pings))).with_cells(7)
        batch = {  # noqa: F841 -- DuckDB reads the local by name
            "vehicle": np.array([p.vehicle_id for p in pings], dtype=object),
            "ts": np.round(columns.ts * 1000).astype(np.int64),
            "lat": np.round(columns.lat * 1e6).astype(np.int32),
            "lon": np.round(columns.lon * 1e6).astype(np.int32),
            "speed": np.round(columns.speed * 10),
            "heading": np.round(columns.heading),
            "cell": columns.cell,
        }
        self.db.execute(
            """INSERT INTO positions SELECT vehicle, ts, lat, lon,
                   CAST(speed AS SMALLINT), CAST(heading AS SMALLINT), cell FROM batch"""
        )

    def maintain(self, now: float) -> None:
        """Nothing: DuckDB checkpoints on its own."""

    def settle(self) -> None:
        self.db.execute("CHECKPOINT")

    def track(self, vehicle_id: str, start: float, end: float) -> int:
        rows = self.db.execute(
            """SELECT ts, lat, lon, speed, heading FROM positions
               WHERE vehicle = ? AND ts >= ? AND ts < ? ORDER BY ts LIMIT 100000""",
            [vehicle_id, int(start * 1000), int(end * 1000)],
        ).fetchnumpy()
        return len(rows["ts"])

    def area(self, cells: set[int], start: float, end: float, limit: int) -> int:
        rows = self.db.execute(
            """SELECT vehicle, ts, lat, lon, speed, heading FROM positions
               WHERE cell IN (SELECT unnest(?::UBIGINT[])) AND ts >= ? AND ts < ?
               ORDER BY vehicle, ts LIMIT ?""",
            [sorted(cells), int(start * 1000), int(end * 1000), limit],
        ).fetchnumpy()
        return len(rows["ts"])

    def bytes_on_disk(self) -> int:
        return sum(
            os.path.getsize(path)
            for path in (self.path, self.path + ".wal")
            if os.path.exists(path)
        )

    def close(self) -> None:
        self.db.close()


def fleet_seconds(vehicles: int, seconds: int) -> Iterator[tuple[list[str], PingBatch]]:
    """Each second's pings of the simulator's fleet (1 Hz), the same on every call."""
    config = FleetConfig(
        vehicles=vehicles,
        center_lat=CITY[0],
        center_lon=CITY[1],
        ping_interval_min_s=1.0,
        ping_interval_max_s=1.0,
    )
    fleet = Fleet(config, start_time=START)
    for _ in range(seconds):
        yield fleet.vehicle_ids, fleet.advance(1.0)


def as_pings(ids: list[str], batch: PingBatch) -> list[Ping]:
    return [
        Ping(vehicle_id=ids[v], lat=la, lon=lo, ts=t, speed=s, heading=h)
        for v, la, lo, t, s, h in batch.rows()
    ]


def day_commits(first_hour: list[Ping]) -> Iterator[list[Ping]]:
    """The day before and including the fleet's hour of one more vehicle, one commit per
    hour: the fleet's first vehicle's hour (3,600 positions), once for each hour."""
    for hours_back in range(23, -1, -1):
        yield [
            Ping(
                vehicle_id=DAY_VAN,
                lat=p.lat,
                lon=p.lon,
                ts=p.ts - hours_back * 3600,
                speed=p.speed,
                heading=p.heading,
            )
            for p in first_hour
        ]


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


def measure(contender: Contender, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one contender (see the module docstring)."""
    appending, maintaining, positions = 0.0, 0.0, 0
    maintaining_cpu = 0.0  # the compaction's own CPU, whatever else shares the machine
    first_hour: list[Ping] = []
    for second, (ids, batch) in enumerate(fleet_seconds(args.vehicles, args.seconds), 1):
        pings = as_pings(ids, batch)
        first_hour += [p for p in pings if p.vehicle_id == ids[0]]
        began = time.perf_counter()
        contender.append(pings)
        appending += time.perf_counter() - began
        positions += len(pings)
        if second % COMPACT_EVERY_S == 0:
            began, began_cpu = time.perf_counter(), time.thread_time()
            contender.maintain(START + second)
            maintaining += time.perf_counter() - began
            maintaining_cpu += time.thread_time() - began_cpu
    for pings in day_commits(first_hour):
        began = time.perf_counter()
        contender.append(pings)
        appending += time.perf_counter() - began
        positions += len(pings)
    began, began_cpu = time.perf_counter(), time.thread_time()
    contender.settle()
    settling = time.perf_counter() - began
    settling_cpu = time.thread_time() - began_cpu
    end = START + args.seconds
    day = end - 86_400
    tracks = []
    for _ in range(args.queries):
        began = time.perf_counter()
        found = contender.track(DAY_VAN, day, end)
        tracks.append(time.perf_counter() - began)
    cells = set(h3i.grid_disk(h3i.latlng_to_cell(*CITY, 7), AREA_RINGS))
    pages, wholes = [], []
    for _ in range(max(3, args.queries // 10)):
        began = time.perf_counter()
        contender.area(cells, START, end, AREA_PAGE)
        pages.append(time.perf_counter() - began)
        began = time.perf_counter()
        in_area = contender.area(cells, START, end, 10**9)
        wholes.append(time.perf_counter() - began)
    return {
        "positions": positions,
        "append_pings_per_s": positions / appending,
        "maintain_s (compaction every minute)": maintaining,
        "settle_s (final compact/checkpoint)": settling,
        "pings_per_s_incl_maintenance": positions / (appending + maintaining + settling),
        "compaction_positions_per_s": positions / max(1e-9, maintaining + settling),
        "compaction_positions_per_cpu_s": positions / max(1e-9, maintaining_cpu + settling_cpu),
        "bytes_per_position": contender.bytes_on_disk() / positions,
        "day_track_positions": found,
        "day_track_p50_ms": percentile(tracks, 50) * 1e3,
        "day_track_p99_ms": percentile(tracks, 99) * 1e3,
        "area_first_page_p50_ms": percentile(pages, 50) * 1e3,
        "area_all_pages_p50_ms": percentile(wholes, 50) * 1e3,
        "area_positions": in_area,
    }


CONTENDERS = {"sqlite": SqliteContender, "duckdb": DuckdbContender}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each contender in turn, in a fresh temporary directory; figures side by side."""
    figures: dict[str, Any] = {
        "vehicles": args.vehicles,
        "seconds": args.seconds,
        "day_track_queries": args.queries,
    }
    for name in args.contenders.split(","):
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            contender = CONTENDERS[name](directory)
            try:
                for figure, value in measure(contender, args).items():
                    figures[f"{name}.{figure}"] = value
            finally:
                contender.close()
    return figures


def add_store(sections: Any) -> None:
    """The ``store`` subcommand."""
    parser = sections.add_parser("store", help=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=3600, help="simulated seconds at 1 Hz")
    parser.add_argument("--queries", type=int, default=100, help="day-track queries timed")
    parser.add_argument("--contenders", default="sqlite,duckdb", help="comma-separated")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.set_defaults(run=run)
