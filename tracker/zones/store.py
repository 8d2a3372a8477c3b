"""Where zone definitions are kept: the tracker's database (``tracker.database``).

One table, ``zones_zones``: each zone's id and its GeoJSON Feature as JSON text, in the
same database as history (``TrackerConfig.database_target``: SQLite by default,
PostgreSQL with ``--history postgresql://...``). Its schema is the ``zones`` component's
versioned migrations.

A local SQLite file is created only when the first zone is written: a tracker that never
holds a zone leaves no file behind. Every method is synchronous: call it from a worker
thread (``trio.to_thread``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import msgspec

from tracker.database import Migrations, PostgresDatabase, SqliteDatabase, open_database

__all__ = ["MIGRATIONS", "ZoneStore"]

MIGRATIONS: Final = Migrations(
    "zones",
    [
        [
            "CREATE TABLE zones_zones (id TEXT PRIMARY KEY, feature TEXT NOT NULL, "
            "updated_at DOUBLE PRECISION NOT NULL)"
        ]
    ],
)


class ZoneStore:
    """Zone Features by id, in the database at ``target``."""

    def __init__(self, target: str) -> None:
        self._database: SqliteDatabase | PostgresDatabase = open_database(target)
        self.where = self._database.where
        self._migrated = False
        self._mark = "?" if isinstance(self._database, SqliteDatabase) else "%s"

    def load(self) -> list[dict[str, Any]]:
        """Every stored zone's Feature (none, and no file made, for a new SQLite file)."""
        database = self._database
        if isinstance(database, SqliteDatabase) and not os.path.exists(database.path):
            return []
        with self._writing() as connection:
            rows = connection.execute("SELECT feature FROM zones_zones ORDER BY id").fetchall()
        return [msgspec.json.decode(row[0]) for row in rows]

    def put(self, features: Sequence[dict[str, Any]]) -> None:
        """Store (insert or replace) ``features`` in one transaction."""
        now = time.time()
        mark = self._mark
        statement = (
            f"INSERT INTO zones_zones (id, feature, updated_at) VALUES ({mark}, {mark}, {mark}) "
            "ON CONFLICT (id) DO UPDATE SET feature = excluded.feature, "
            "updated_at = excluded.updated_at"
        )
        with self._writing() as connection:
            for feature in features:
                text = msgspec.json.encode(feature).decode()
                connection.execute(statement, (feature["id"], text, now))

    def delete(self, zone_id: str) -> None:
        with self._writing() as connection:
            connection.execute(f"DELETE FROM zones_zones WHERE id = {self._mark}", (zone_id,))

    def close(self) -> None:
        self._database.close()

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        """A connection in a write transaction, the schema migrated on first use."""
        database = self._database
        if not self._migrated:
            with database.migrating(MIGRATIONS) as connection:
                self._migrated = True
                yield connection
            return
        if isinstance(database, SqliteDatabase):
            with database.write() as connection:
                yield connection
        else:
            with database.transaction() as connection:
                yield connection
