"""tracker.history.sqlite: the embedded store's files, threads, migrations and durability.

What every store does is in tests/test_history_store.py; these are SQLite's own: real
files in the test's temporary directory, real threads, a real process killed with -9.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h3.api.basic_int as h3i
import numpy as np
import pytest

from tracker.database import SqliteDatabase
from tracker.history import codec, layout
from tracker.history.codec import Positions
from tracker.history.postgres import PostgresStore
from tracker.history.sqlite import MIGRATIONS, VERSION, SqliteStore
from tracker.history.store import StoreError, open_store
from tracker.pings import Ping

T0 = 1_764_000_000.0
FOREVER = 1e12
BERLIN = (52.52, 13.405)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "history" / "h.sqlite3"


@pytest.fixture
def store(path: Path) -> Iterator[SqliteStore]:
    kept = SqliteStore(path)
    kept.migrate()
    try:
        yield kept
    finally:
        kept.close()


def pings(vehicle_id: str, start: float, count: int, *, step_s: float = 1.0) -> list[Ping]:
    lat, lon = BERLIN
    return [
        Ping(vehicle_id=vehicle_id, lat=lat + i * 1e-5, lon=lon, ts=start + i * step_s, speed=5.0)
        for i in range(count)
    ]


def test_migrate_creates_the_file_and_its_directory_in_wal_mode(
    store: SqliteStore, path: Path
) -> None:
    assert path.exists()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute(
            "SELECT max(version) FROM schema_migrations WHERE component = 'history'"
        ).fetchone() == (VERSION,)


def test_commits_are_fsynced_synchronous_full(store: SqliteStore) -> None:
    store.append(pings("van", T0, 1))
    with store._database.snapshot() as connection:
        assert connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_close_waits_for_a_connection_in_use(store: SqliteStore) -> None:
    """close() under a running query must not close its connection (SQLite may crash)."""
    store.append(pings("van", T0, 3))
    with store._database.snapshot() as connection:
        store.close()
        assert connection.execute("SELECT count(*) FROM raw").fetchone() == (1,)
    with pytest.raises(sqlite3.ProgrammingError):
        connection.execute("SELECT 1")  # closed once given back
    with pytest.raises(StoreError, match="closed"):
        store.track("van", T0, FOREVER, limit=10)


def test_reopen_after_close_keeps_everything_and_the_resolution(path: Path) -> None:
    first = SqliteStore(path, resolution=8)
    first.migrate()
    first.append(pings("van", T0, 100))
    first.compact(T0 + 50)
    first.close()
    again = SqliteStore(path, resolution=7)
    again.migrate()
    assert again.resolution == 8, "a file keeps the resolution it was created with"
    assert len(again.track("van", T0, FOREVER, limit=1000)) == 100
    again.close()


def test_migrate_refuses_a_newer_schema(path: Path, store: SqliteStore) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("INSERT INTO schema_migrations VALUES ('history', ?, 0)", (VERSION + 1,))
    newer = SqliteStore(path)
    with pytest.raises(StoreError, match=rf"schema version {VERSION + 1}.*upgrade the tracker"):
        newer.migrate()
    newer.close()


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    garbage = tmp_path / "not.sqlite3"
    garbage.write_bytes(os.urandom(8192))
    broken = SqliteStore(garbage)
    with pytest.raises(StoreError, match=str(garbage)):
        broken.migrate()
    broken.close()


def test_a_path_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError):
        SqliteStore(tmp_path / "file" / "h.sqlite3").migrate()


def test_a_damaged_blob_is_a_store_error(store: SqliteStore, path: Path) -> None:
    store.append(pings("van", T0, 10))
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE raw SET data = x'544801010a000000deadbeef'")
    with pytest.raises(StoreError, match="damaged"):
        store.track("van", T0, FOREVER, limit=10)


def test_long_unicode_vehicle_ids_are_kept_apart(store: SqliteStore) -> None:
    ids = ["é" * 64, "é" * 63 + "e", "🚚" * 64, "a'; DROP TABLE raw; --", "x" * 64]
    for number, vehicle_id in enumerate(ids):
        store.append(pings(vehicle_id, T0 + number, 3))
    store.compact(FOREVER)
    for number, vehicle_id in enumerate(ids):
        track = store.track(vehicle_id, T0, FOREVER, limit=10)
        assert track.vehicle_id == vehicle_id
        np.testing.assert_allclose(track.ts, T0 + number + np.arange(3))


def test_many_vehicles_appended_out_of_order_come_back_in_time_order(store: SqliteStore) -> None:
    rng = np.random.default_rng(3)
    fleet = [f"v{n}" for n in range(3000)]
    everything = [p for vehicle_id in fleet for p in pings(vehicle_id, T0, 5, step_s=600)]
    order = rng.permutation(len(everything))
    for part in np.array_split(order, 7):
        store.append([everything[i] for i in part])
        store.compact(T0 + 1200)  # whatever is old enough, batch by batch
    assert store.stats().positions == len(everything)
    for vehicle_id in ("v0", "v1234", "v2999"):
        track = store.track(vehicle_id, T0, FOREVER, limit=100)
        np.testing.assert_array_equal(track.ts, T0 + 600 * np.arange(5))
    page = store.area({0}, T0, FOREVER, limit=10)
    assert page.tracks == [] and page.cursor is None


def test_expire_leaves_no_cell_rows_behind(store: SqliteStore, path: Path) -> None:
    store.append(pings("van", T0, 100) + pings("bus", T0 + 7200, 100))
    store.compact(FOREVER)
    while store.expire(T0 + 3600, limit=1):
        pass
    with sqlite3.connect(path) as connection:
        buckets = {row[0] for row in connection.execute("SELECT bucket FROM chunk_cells")}
    assert buckets == {int((T0 + 7200) // 3600)}


def test_stats_counts_the_write_ahead_log(store: SqliteStore, path: Path) -> None:
    store.append(pings("van", T0, 1000))
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0
    assert store.stats().bytes_on_disk == path.stat().st_size + wal.stat().st_size


def test_queries_in_other_threads_see_whole_commits_during_writes(store: SqliteStore) -> None:
    """A reader never sees a compaction half done: no position missing, none twice."""
    batch, batches = 50, 40
    done = threading.Event()
    failures: list[BaseException] = []
    seen: list[int] = []

    def write() -> None:
        try:
            for n in range(batches):
                store.append(pings("van", T0 + n * batch, batch))
                store.compact(T0 + (n - 2) * batch)
        except BaseException as error:
            failures.append(error)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                track = store.track("van", T0, FOREVER, limit=100_000)
                assert len(track) % batch == 0, len(track)
                assert len(np.unique(track.ts)) == len(track)
                area = store.area(store_cells(), T0, FOREVER, limit=100_000)
                assert sum(len(t) for t in area.tracks) % batch == 0
                seen.append(len(track))
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=write), *(threading.Thread(target=read) for _ in range(2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert seen, "the readers ran"
    assert len(store.track("van", T0, FOREVER, limit=100_000)) == batch * batches


def store_cells() -> set[int]:
    return set(h3i.grid_disk(h3i.latlng_to_cell(*BERLIN, 7), 2))


KILLED_WRITER = """
import sys
from tracker.history.sqlite import SqliteStore
from tracker.pings import Ping
store = SqliteStore(sys.argv[1])
store.migrate()
for n in range(1_000_000):
    store.append([Ping(vehicle_id=f"v{i}", lat=52.5, lon=13.4, ts=1e9 + n) for i in range(100)])
    print(n + 1, flush=True)
"""


def test_every_returned_append_survives_kill_9(path: Path) -> None:
    path.parent.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    acknowledged = 0
    deadline = time.monotonic() + 30
    while acknowledged < 20 and time.monotonic() < deadline:
        acknowledged = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    acknowledged = max([acknowledged, *(int(line) for line in writer.stdout.read().split())])
    reopened = SqliteStore(path)
    reopened.migrate()
    kept = reopened.stats().positions
    reopened.close()
    assert acknowledged >= 20
    assert kept in (100 * acknowledged, 100 * (acknowledged + 1)), (kept, acknowledged)


@pytest.mark.parametrize(
    ("target", "kind", "where"),
    [
        ("history.sqlite3", SqliteStore, "history.sqlite3"),
        ("sqlite:/var/x.db", SqliteStore, "/var/x.db"),
        ("  sqlite:rel/x.db ", SqliteStore, "rel/x.db"),
        ("postgresql://u:pw@localhost/db", PostgresStore, None),
        ("postgres://localhost/db", PostgresStore, None),
    ],
)
def test_open_store_by_target(target: str, kind: type, where: str | None) -> None:
    opened = open_store(target, resolution=9)
    assert isinstance(opened, kind)
    assert opened.resolution == 9
    if where is not None:
        assert isinstance(opened, SqliteStore) and opened.path == where


@pytest.mark.parametrize("target", ["", "  ", "sqlite:", "redis://u:secret@host/0", "s3://bucket"])
def test_open_store_refuses_other_targets_without_showing_passwords(target: str) -> None:
    with pytest.raises(ValueError, match="neither postgresql") as raised:
        open_store(target)
    assert "secret" not in str(raised.value)


def test_a_version_1_file_reads_the_same_once_migrated(path: Path) -> None:
    """A file of the first layout (one raw row per commit, one chunk row per vehicle and
    hour, versions in schema_version) keeps every position through the migration."""
    hour0, hour1 = pings("van", T0, 100), pings("van", T0 + 3600, 50)
    os.makedirs(path.parent)
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER, applied_at REAL)")
        connection.execute("INSERT INTO schema_version VALUES (1, 0)")
    database = SqliteDatabase(path)
    with database.write() as c:
        for statement in MIGRATIONS[0]:  # version 1 as the first tracker made it
            c.execute(statement)
        c.execute("INSERT INTO meta VALUES ('resolution', '7')")
        c.execute("INSERT INTO vehicles VALUES (1, 'van')")
        chunk = layout.segments([Positions.from_pings(hour0, [1] * 100).with_cells(7)], 7)[0]
        cells = np.array(chunk.cells, np.int64).tobytes()
        c.execute(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
            (1, chunk.bucket, chunk.t0_ms, chunk.t1_ms, chunk.size, cells, chunk.blob),
        )
        c.executemany(
            "INSERT INTO chunk_cells VALUES (?, ?, 1)",
            ((cell, chunk.bucket) for cell in chunk.cells),
        )
        raw = Positions.from_pings(hour1, [1] * 50).sorted()
        c.execute(
            "INSERT INTO raw (t0, t1, size, data) VALUES (?, ?, ?, ?)",
            (layout.ms(T0 + 3600), layout.ms(T0 + 3649), 50, codec.encode(raw)),
        )
    database.close()
    migrated = SqliteStore(path)
    migrated.migrate()
    assert migrated.stats().positions == 150
    assert len(migrated.track("van", T0, FOREVER, limit=1000)) == 150
    migrated.append(pings("van", T0 + 3650, 10))
    assert migrated.compact(FOREVER) == 60
    track = migrated.track("van", T0, FOREVER, limit=1000)
    np.testing.assert_allclose(
        track.ts, [p.ts for p in hour0 + hour1] + [T0 + 3650 + i for i in range(10)]
    )
    assert migrated.stats().positions == 160
    with migrated._database.snapshot() as connection:
        assert connection.execute("SELECT count(*) FROM chunks").fetchone() == (2,)  # sealed
    migrated.close()
