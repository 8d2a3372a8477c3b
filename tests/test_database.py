"""tracker.database: the SQLite file and PostgreSQL pool every component shares, and the
versioned migrations per component (both databases), apart from any component."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import psycopg
import pytest

from tracker.config import DEFAULT_STATE, TrackerConfig
from tracker.database import (
    DatabaseError,
    Migrations,
    PostgresDatabase,
    SqliteDatabase,
    open_database,
)

ZONES_V1 = ("CREATE TABLE zones_zone (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",)
ZONES_V2 = ("ALTER TABLE zones_zone ADD COLUMN color TEXT",)
ALERTS_V1 = ("CREATE TABLE alerts_event (id INTEGER PRIMARY KEY, body TEXT)",)


def versions(connection: sqlite3.Connection | psycopg.Connection, component: str) -> list[int]:
    rows = connection.execute(
        f"SELECT version FROM schema_migrations WHERE component = '{component}' ORDER BY 1"
    ).fetchall()
    return [row[0] for row in rows]


def test_database_target_is_the_history_or_a_local_state_file() -> None:
    assert TrackerConfig().database_target == DEFAULT_STATE == "tracker-data/state.sqlite3"
    assert TrackerConfig(history="off").database_target == DEFAULT_STATE
    assert TrackerConfig(history="h.sqlite3").database_target == "h.sqlite3"
    url = "postgresql://u:pw@db/t"
    assert TrackerConfig(history=url).database_target == url


def test_open_database_by_target(tmp_path: Path) -> None:
    assert isinstance(open_database(f"sqlite:{tmp_path}/a.db"), SqliteDatabase)
    assert open_database(str(tmp_path / "b.db")).path == str(tmp_path / "b.db")  # type: ignore[union-attr]
    assert isinstance(open_database("postgres://u@h/db"), PostgresDatabase)
    for bad in ("", "  ", "redis://h", "sqlite:"):
        with pytest.raises(ValueError):
            open_database(bad)


def test_sqlite_components_migrate_on_their_own_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite3"
    database = SqliteDatabase(path)
    with database.migrating(Migrations("zones", [ZONES_V1])) as connection:
        connection.execute("INSERT INTO zones_zone (name) VALUES ('depot')")
    with database.migrating(Migrations("alerts", [ALERTS_V1])):
        pass
    with database.migrating(Migrations("zones", [ZONES_V1, ZONES_V2])):
        pass
    with database.migrating(Migrations("zones", [ZONES_V1, ZONES_V2])):  # nothing to do
        pass
    with database.snapshot() as connection:
        assert versions(connection, "zones") == [1, 2]
        assert versions(connection, "alerts") == [1]
        assert connection.execute("SELECT name, color FROM zones_zone").fetchall() == [
            ("depot", None)
        ]
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    database.close()


def test_sqlite_a_failing_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "state.sqlite3")
    broken = Migrations("zones", [ZONES_V1, ("CREATE TABLE zones_zone (x)",)])
    with pytest.raises(DatabaseError, match="already exists"), database.migrating(broken):
        pass
    with database.snapshot() as connection:
        tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        assert [name for (name,) in tables] == []  # not even schema_migrations
    database.close()


def test_sqlite_a_newer_schema_is_refused(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "state.sqlite3")
    with database.migrating(Migrations("zones", [ZONES_V1, ZONES_V2])):
        pass
    older = Migrations("zones", [ZONES_V1])
    with (
        pytest.raises(DatabaseError, match=r"zones schema version 2; .* up to 1: upgrade"),
        database.migrating(older),
    ):
        pass
    database.close()


def test_sqlite_a_legacy_version_table_is_adopted_and_dropped(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute(ZONES_V1[0])
        connection.execute("CREATE TABLE zone_versions (version INTEGER, applied_at REAL)")
        connection.execute("INSERT INTO zone_versions VALUES (1, 0)")
    database = SqliteDatabase(path)
    with database.migrating(Migrations("zones", [ZONES_V1, ZONES_V2], "zone_versions")):
        pass
    with database.snapshot() as connection:
        assert versions(connection, "zones") == [1, 2]
        assert connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'zone_versions'"
        ).fetchone() == (0,)
    database.close()


def test_sqlite_close_never_closes_a_connection_in_use(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "state.sqlite3")
    with database.migrating(Migrations("zones", [ZONES_V1])):
        pass
    with database.snapshot() as connection:
        database.close()
        assert connection.execute("SELECT count(*) FROM zones_zone").fetchone() == (0,)
    with pytest.raises(sqlite3.ProgrammingError):
        connection.execute("SELECT 1")  # closed once given back
    with pytest.raises(DatabaseError, match="closed"), database.snapshot():
        pass


def test_sqlite_a_connection_is_lent_to_one_thread_at_a_time(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "state.sqlite3")
    with database.migrating(Migrations("zones", [ZONES_V1])):
        pass
    seen: list[int] = []
    ready, release = threading.Event(), threading.Event()

    def reader() -> None:
        with database.snapshot() as connection:
            seen.append(id(connection))
            ready.set()
            release.wait(10)

    thread = threading.Thread(target=reader)
    thread.start()
    assert ready.wait(10)
    with database.write() as connection:
        assert id(connection) not in seen  # the reader's is still lent
        connection.execute("INSERT INTO zones_zone (name) VALUES ('a')")
    release.set()
    thread.join(10)
    database.close()


def test_sqlite_errors_name_the_file(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "state.sqlite3")
    with (
        pytest.raises(DatabaseError, match=r"state\.sqlite3: no such table"),
        database.snapshot() as connection,
    ):
        connection.execute("SELECT * FROM nowhere")
    database.close()


def test_postgres_components_migrate_once_even_when_started_together(postgres: str) -> None:
    databases = [PostgresDatabase(postgres) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate(database: PostgresDatabase) -> None:
        try:
            barrier.wait(10)
            with database.migrating(Migrations("zones", [ZONES_V1, ZONES_V2])):
                pass
            with database.migrating(Migrations("alerts", [ALERTS_V1])):
                pass
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=migrate, args=(d,)) for d in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    with databases[0].snapshot() as connection:
        assert versions(connection, "zones") == [1, 2]
        assert versions(connection, "alerts") == [1]
    older = Migrations("zones", [ZONES_V1])
    with (
        pytest.raises(DatabaseError, match=r"zones schema version 2.*upgrade"),
        databases[0].migrating(older),
    ):
        pass
    for database in databases:
        database.close()


def test_postgres_errors_name_the_server_without_its_password(postgres: str) -> None:
    url = postgres.replace("postgres@", "postgres:s3cret@", 1)
    database = PostgresDatabase(url)
    with pytest.raises(DatabaseError) as raised, database.connection() as connection:
        connection.execute("SELECT * FROM nowhere")
    assert "nowhere" in str(raised.value) and "s3cret" not in str(raised.value)
    database.close()
