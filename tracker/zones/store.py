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

    @property
    def present(self) -> bool:
        """Whether there can be zones stored: a PostgreSQL database, or an SQLite file
        that exists (a cheap check, fine on the event loop)."""
        database = self._database
        return not isinstance(database, SqliteDatabase) or os.path.exists(database.path)

    def versions(self) -> dict[str, float]:
        """Every stored zone's id and when it was last written (none for a new file)."""
        if not self.present:
            return {}
        with self._writing() as connection:
            rows = connection.execute("SELECT id, updated_at FROM zones_zones").fetchall()
        return {str(row[0]): float(row[1]) for row in rows}

    def features(self, ids: Sequence[str]) -> list[tuple[dict[str, Any], float]]:
        """The Features of ``ids`` that are stored, with when each was last written."""
        found: list[tuple[dict[str, Any], float]] = []
        if not ids or not self.present:
            return found
        with self._writing() as connection:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                marks = ", ".join([self._mark] * len(chunk))
                rows = connection.execute(
                    f"SELECT feature, updated_at FROM zones_zones WHERE id IN ({marks})", chunk
                ).fetchall()
                found += [(msgspec.json.decode(row[0]), float(row[1])) for row in rows]
        return found

    def put(self, features: Sequence[dict[str, Any]]) -> float:
        """Store (insert or replace) ``features`` in one transaction; returns the time
        written with them (what :meth:`versions` will say)."""
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
        return now

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
