"""PostgresStore as several tracker instances and a real server's failures see it.

What every store does is in tests/test_history_store.py; here: two stores on one
database at once, migrations racing and refusing a newer schema, and a server that dies
or stops answering (a StoreError that names the server without its password, soon, never
a hang; the store works again once the server is back).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.postgres_server import PostgresServer
from tests.test_history_store import FOREVER, MUNICH, T0, assert_track_is, drive
from tracker.history import codec, layout
from tracker.history.codec import Positions
from tracker.history.postgres import MIGRATIONS, VERSION, PostgresStore
from tracker.history.store import StoreError

PASSWORD = "s3cret-pw"


def in_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(0..count-1)`` in threads started together; re-raise the first error."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            work(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    if errors:
        raise errors[0]


def test_stores_migrating_at_once_migrate_once(postgres: str) -> None:
    stores = [PostgresStore(postgres) for _ in range(4)]
    try:
        in_threads(4, lambda n: stores[n].migrate())
    finally:
        for store in stores:
            store.close()
    with psycopg.connect(postgres) as connection:
        versions = connection.execute(
            "SELECT version FROM schema_migrations WHERE component = 'history' ORDER BY version"
        ).fetchall()
    assert versions == [(version,) for version in range(1, VERSION + 1)]


def test_a_newer_schema_is_refused(postgres: str) -> None:
    store = PostgresStore(postgres)
    store.migrate()
    with psycopg.connect(postgres) as connection:
        connection.execute(
            "INSERT INTO schema_migrations VALUES ('history', %s, 0)", (VERSION + 1,)
        )
    with pytest.raises(StoreError, match="upgrade the tracker"):
        PostgresStore(postgres).migrate()
    store.close()


def test_a_database_keeps_the_resolution_it_was_created_with(postgres: str) -> None:
    first = PostgresStore(postgres, resolution=7)
    first.migrate()
    second = PostgresStore(postgres, resolution=9)
    second.migrate()
    assert second.resolution == 7
    first.close()
    second.close()


@pytest.fixture
def two_instances(postgres: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two tracker instances have."""
    a, b = PostgresStore(postgres), PostgresStore(postgres)
    in_threads(2, lambda n: (a, b)[n].migrate())
    yield a, b
    a.close()
    b.close()


def test_two_instances_see_each_others_pings(
    two_instances: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two_instances
    van = drive("van", T0, 100)
    a.append(van[::2])
    b.append(van[1::2])
    truck = drive("truck", T0, 10, origin=MUNICH)
    b.append(truck)
    for store in (a, b):
        assert_track_is(store.track("van", T0, FOREVER, limit=1000), van)
        assert_track_is(store.track("truck", T0, FOREVER, limit=1000), truck)


def test_two_instances_appending_and_compacting_at_once_keep_every_ping_once(
    two_instances: tuple[PostgresStore, PostgresStore],
) -> None:
    """Both append pings of the same vehicles (numbered by whichever comes first) and
    compact all the time; afterwards every ping is in exactly one place."""
    fleet = {f"v{n}": drive(f"v{n}", T0, 400) for n in range(20)}
    rounds = 20

    def instance(index: int) -> None:
        store = two_instances[index]
        for round_ in range(rounds):
            step = 400 // rounds
            batch = [
                ping
                for track in fleet.values()
                for ping in track[round_ * step : (round_ + 1) * step][index::2]
            ]
            store.append(batch)
            store.compact(FOREVER)

    in_threads(2, instance)
    a, b = two_instances
    a.compact(FOREVER)
    assert a.stats().positions == 20 * 400
    for vehicle, pings in fleet.items():
        assert_track_is(b.track(vehicle, T0, FOREVER, limit=1000), pings)


def test_a_store_that_cannot_connect_says_where_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/nowhere?connect_timeout=2"
    store = PostgresStore(url)
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        store.migrate()
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "127.0.0.1:1/nowhere" in message
    assert PASSWORD not in message and PASSWORD not in repr(raised.value.__cause__)


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A private server of this test's own, to kill, freeze and restart."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@").replace("=5", "=2")


def test_a_server_that_dies_is_a_store_error_then_the_store_recovers(
    own_server: PostgresServer,
) -> None:
    store = PostgresStore(with_password(own_server.create_database()))
    store.migrate()
    pings = drive("van", T0, 20)
    store.append(pings[:10])
    own_server.kill()
    for _ in range(2):  # the broken connection, then a refused new one
        started = time.monotonic()
        with pytest.raises(StoreError, match="PostgreSQL at postgresql://postgres:\\*\\*\\*@"):
            store.append(pings[10:])
        assert time.monotonic() - started < 5
    own_server.start()
    store.append(pings[10:])
    assert_track_is(store.track("van", T0, FOREVER, limit=100), pings)
    store.close()


def test_a_server_that_stops_answering_is_a_store_error_not_a_hang(
    own_server: PostgresServer,
) -> None:
    store = PostgresStore(with_password(own_server.create_database()), timeout_s=1.0)
    store.migrate()
    own_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.append(drive("van", T0, 10))
        assert time.monotonic() - started < 1.0 * 1.5 + 1
        started = time.monotonic()
        with pytest.raises(StoreError, match="timeout"):
            store.track("van", T0, FOREVER, limit=10)  # a new connection: connect_timeout
        assert time.monotonic() - started < 2 + 1
    finally:
        own_server.thaw()
    store.append(drive("van", T0, 10))
    assert len(store.track("van", T0, FOREVER, limit=100)) == 10
    store.close()


def test_a_statement_past_its_timeout_is_cancelled_by_the_server(postgres: str) -> None:
    store = PostgresStore(postgres, timeout_s=0.5)
    store.migrate()
    with psycopg.connect(postgres) as blocker, blocker.transaction():
        blocker.execute("LOCK TABLE history_raw IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreError, match="timeout"):
            store.append(drive("van", T0, 10))
        assert time.monotonic() - started < 2
    store.append(drive("van", T0, 10))
    store.close()


def test_connections_are_pooled_not_kept_per_thread(postgres: str) -> None:
    """Trio's worker threads come and go; the store's connections must not pile up."""
    store = PostgresStore(postgres, pool_size=3)
    store.migrate()
    store.append(drive("van", T0, 10))
    for _ in range(10):  # ten generations of short-lived threads, four at a time
        in_threads(4, lambda n: store.track("van", T0, FOREVER, limit=10) and None)
    with psycopg.connect(postgres) as connection:
        row = connection.execute(
            """SELECT count(*) FROM pg_stat_activity
               WHERE datname = current_database() AND application_name = 'tracker-history'"""
        ).fetchone()
    assert row is not None and 1 <= row[0] <= 3
    store.close()


def test_the_urls_options_are_kept_so_a_schema_can_hold_the_tables(postgres: str) -> None:
    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute("CREATE SCHEMA elsewhere")
    store = PostgresStore(f"{postgres}&options=-csearch_path%3Delsewhere")
    store.migrate()
    store.append(drive("van", T0, 10))
    with psycopg.connect(postgres) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'elsewhere'"
        ).fetchone()
    assert row is not None and row[0] >= 5
    assert len(store.track("van", T0, FOREVER, limit=100)) == 10
    store.close()


def test_a_version_1_database_reads_the_same_once_migrated(postgres: str) -> None:
    """Tables of the first layout (versions in history_schema) keep every position."""
    hour0 = drive("van", T0, 100)
    hour1 = drive("van", T0 + 3600, 50)
    chunk = layout.segments([Positions.from_pings(hour0, [1] * 100).with_cells(7)], 7)[0]
    raw = Positions.from_pings(hour1, [1] * 50).sorted()
    with psycopg.connect(postgres, autocommit=True) as connection:
        for statement in MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("CREATE TABLE history_schema (version integer PRIMARY KEY)")
        connection.execute("INSERT INTO history_schema VALUES (1)")
        connection.execute("INSERT INTO history_meta VALUES ('resolution', '7')")
        connection.execute("INSERT INTO history_vehicles (id, name) VALUES (1, 'van')")
        connection.execute(
            "INSERT INTO history_chunks VALUES (1, %s, %s, %s, %s, %s, %s)",
            (chunk.bucket, chunk.t0_ms, chunk.t1_ms, chunk.size, chunk.cells, chunk.blob),
        )
        connection.execute(
            "INSERT INTO history_raw (t0, t1, size, data) VALUES (%s, %s, 50, %s)",
            (layout.ms(T0 + 3600), layout.ms(T0 + 3649), codec.encode(raw)),
        )
    store = PostgresStore(postgres)
    store.migrate()
    try:
        assert store.stats().positions == 150
        assert_track_is(store.track("van", T0, FOREVER, limit=1000), hour0 + hour1)
        assert store.compact(FOREVER) == 50
        assert_track_is(store.track("van", T0, FOREVER, limit=1000), hour0 + hour1)
    finally:
        store.close()
