"""History kept in one local SQLite file: the embedded default, no server to run.

:class:`SqliteStore` implements :class:`~tracker.history.store.HistoryStore` on the layout
every store keeps (:mod:`tracker.history.layout`, ``docs/history.md``): ``raw`` holds one
row per commit (every ping of the commit, one blob), ``chunks`` one row per vehicle and
hour (one blob, its time span, size and cells), and ``chunk_cells`` one row per cell a
chunk touched, keyed ``(cell, bucket, vehicle)`` so that an area query finds its chunks
by an index range per cell.

The file is a :class:`~tracker.database.SqliteDatabase` (other components may keep their
tables in it too): WAL mode, so queries (readers) never wait for the writer nor the
writer for them, and ``synchronous=FULL``: each commit is fsynced before
:meth:`SqliteStore.append` returns, so a returned append survives a kill -9 of the
process (which ``NORMAL`` would already give in WAL mode) and a power cut too (which
``NORMAL`` would not). At one group commit per second the fsync is cheap.

Threads: connections are lent to one calling thread at a time: writes (append, compact,
expire) come from one thread, queries from others at the same time, each on a snapshot
(one read transaction), so a compaction committing between reading chunks and raw
batches never hides or doubles positions. Every failure is a
:class:`~tracker.history.store.StoreError` naming the file.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any, Final

import numpy as np

from tracker.database import Migrations, SqliteDatabase
from tracker.history import layout
from tracker.history.decoded import DecodedChunks
from tracker.history.store import AreaPage, StoreError, StoreStats, Track
from tracker.pings import Ping

__all__ = ["SqliteStore"]

_VEHICLE_ID = operator.attrgetter("vehicle_id")

COMPACT_STEP_POSITIONS: Final = 100_000
"""Raw positions merged per compaction transaction: short locks, bounded memory."""
COMPACT_STEP_BATCHES: Final = 1_000
SEAL_STEP_CHUNKS: Final = 500
"""Chunks sealed per transaction (each decoded and encoded once: a few ms at most)."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        "CREATE TABLE vehicles (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
        # One row per commit: all its pings, columnar, compressed; times in ms.
        """CREATE TABLE raw (
            id INTEGER PRIMARY KEY,
            t0 INTEGER NOT NULL,
            t1 INTEGER NOT NULL,
            size INTEGER NOT NULL,
            data BLOB NOT NULL
        )""",
        "CREATE INDEX raw_t1 ON raw (t1)",
        # One row per vehicle and hour; cells: the distinct cells, int64 little-endian.
        """CREATE TABLE chunks (
            vehicle INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            t0 INTEGER NOT NULL,
            t1 INTEGER NOT NULL,
            size INTEGER NOT NULL,
            cells BLOB NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (vehicle, bucket)
        )""",
        "CREATE INDEX chunks_bucket ON chunks (bucket)",
        """CREATE TABLE chunk_cells (
            cell INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            vehicle INTEGER NOT NULL,
            PRIMARY KEY (cell, bucket, vehicle)
        ) WITHOUT ROWID""",
    ),
    (
        # Raw batches cut by vehicle shard (layout.RAW_SHARDS): a track reads its
        # vehicle's shard only. Batches kept before hold every shard: -1.
        "ALTER TABLE raw ADD COLUMN shard INTEGER NOT NULL DEFAULT -1",
        "CREATE INDEX raw_shard ON raw (shard, t1)",
        f"INSERT INTO meta (key, value) VALUES ('raw_shards', '{layout.RAW_SHARDS}')",
        # A chunk is one or more segments (seq > 0: appended by a compaction; 0: sealed).
        """CREATE TABLE chunks_v2 (
            vehicle INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            t0 INTEGER NOT NULL,
            t1 INTEGER NOT NULL,
            size INTEGER NOT NULL,
            cells BLOB NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (vehicle, bucket, seq)
        )""",
        "INSERT INTO chunks_v2 SELECT vehicle, bucket, 0, t0, t1, size, cells, data FROM chunks",
        "DROP TABLE chunks",
        "ALTER TABLE chunks_v2 RENAME TO chunks",
        "CREATE INDEX chunks_bucket ON chunks (bucket)",
        "CREATE INDEX chunks_unsealed ON chunks (bucket) WHERE seq > 0",
        # Positions kept, counted as they come and go: stats() reads one row.
        "CREATE TABLE counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        """INSERT INTO counts VALUES ('positions',
               (SELECT coalesce(sum(size), 0) FROM raw)
             + (SELECT coalesce(sum(size), 0) FROM chunks))""",
        # Compaction steps so far: each step's segments are numbered by it (raw ids
        # cannot: SQLite reuses the largest rowid once it is deleted).
        "INSERT INTO counts VALUES ('compactions', 0)",
        # Pings the store refused to keep (it cannot encode them): kept as they came.
        """CREATE TABLE rejected (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            reason TEXT NOT NULL,
            pings BLOB NOT NULL
        )""",
    ),
)
"""Schema versions: ``MIGRATIONS[n]`` takes a file from version n to n + 1."""
VERSION: Final = len(MIGRATIONS)
SCHEMA: Final = Migrations("history", MIGRATIONS, legacy_table="schema_version")
"""History's versions in ``schema_migrations`` (before: its own ``schema_version``)."""


class SqliteStore:
    """History in the SQLite file at ``path`` (created with its directory if missing).

    :meth:`migrate` must run once before anything else. ``resolution`` is that of a new
    file; an existing one keeps its own (read by :meth:`migrate`).
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int = 7) -> None:
        self._database = SqliteDatabase(path)
        self.path = self._database.path
        self._where = self._database.where = f"history file {self.path}"
        self.resolution = resolution
        self.raw_shards = layout.RAW_SHARDS
        self.decoded = DecodedChunks()
        self._lock = threading.Lock()
        self._vehicles: dict[str, int] = {}
        self._names: dict[int, str] = {}

    # -- the HistoryStore protocol ---------------------------------------------------

    def migrate(self) -> None:
        with self._database.migrating(SCHEMA) as connection:
            connection.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('resolution', ?)",
                (str(self.resolution),),
            )
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        self.resolution = int(meta["resolution"])
        self.raw_shards = int(meta["raw_shards"])

    def append(self, pings: Sequence[Ping]) -> None:
        if not pings:
            return
        try:
            with self._database.write() as connection:
                numbers = self._numbers(connection, list(map(_VEHICLE_ID, pings)))
                rows = layout.raw_rows(pings, numbers, self.raw_shards)
                connection.executemany(
                    "INSERT INTO raw (shard, t0, t1, size, data) VALUES (?, ?, ?, ?, ?)", rows
                )
                self._count(connection, len(pings))
        except StoreError:
            # Vehicles numbered in the rolled-back transaction are numbered no more.
            with self._lock:
                self._vehicles.clear()
                self._names.clear()
            raise

    def reject(self, pings: Sequence[Ping], reason: str) -> None:
        with self._database.write() as connection:
            connection.execute(
                "INSERT INTO rejected (at, reason, pings) VALUES (?, ?, ?)",
                (time.time(), reason, layout.rejected_blob(pings)),
            )

    def compact(self, before: float, *, steps: int | None = None) -> int:
        return layout.compact_in_steps(
            self._compact_step, self.seal, before, steps=steps, seal_limit=SEAL_STEP_CHUNKS
        )

    def expire(self, before: float, *, limit: int) -> int:
        before_ms = layout.ms(layout.clamp_time(before))
        with self._database.write() as connection:
            chunks = connection.execute(
                """SELECT vehicle, bucket, cells, size FROM chunks WHERE bucket < ? LIMIT ?""",
                (layout.bucket_before(before), limit),
            ).fetchall()
            connection.executemany(
                "DELETE FROM chunk_cells WHERE cell = ? AND bucket = ? AND vehicle = ?",
                {
                    (cell, bucket, vehicle)
                    for vehicle, bucket, cells, _ in chunks
                    for cell in np.frombuffer(cells, np.int64).tolist()
                },
            )
            connection.executemany(
                "DELETE FROM chunks WHERE vehicle = ? AND bucket = ?",
                {(vehicle, bucket) for vehicle, bucket, _, _ in chunks},
            )
            batches = connection.execute(
                """DELETE FROM raw WHERE id IN (SELECT id FROM raw WHERE t1 < ? LIMIT ?)
                   RETURNING size""",
                (before_ms, limit - len(chunks)),
            ).fetchall()
            self._count(connection, -sum(row[-1] for row in chunks + batches))
        return len(chunks) + len(batches)

    def track(
        self, vehicle_id: str, start: float, end: float, *, limit: int, after: float | None = None
    ) -> Track:
        lo = start if after is None else max(start, after)
        lo_ms, hi_ms = layout.ms_range(lo, end)
        with self._database.snapshot() as connection:
            vehicle = self._known_number(connection, vehicle_id)
            if vehicle is None or limit <= 0:
                return layout.track_of(vehicle_id, -1, [], start, end, limit=0)
            spans = [
                layout.ChunkSpan(*row)
                for row in connection.execute(
                    """SELECT bucket, min(t0), max(t1), sum(size) FROM chunks
                       WHERE vehicle = ? AND bucket BETWEEN ? AND ? AND t1 >= ? AND t0 < ?
                       GROUP BY bucket ORDER BY bucket""",
                    (vehicle, *layout.buckets(lo, end), lo_ms, hi_ms),
                )
            ]
            needed = spans[: layout.chunks_to_read(spans, lo, end, limit)]
            chunks = self._chunk_blobs(connection, vehicle, [span.bucket for span in needed])
            raw = _column(
                connection.execute(
                    """SELECT data FROM raw WHERE shard IN (-1, ?) AND t1 >= ? AND t0 < ?
                       ORDER BY id""",
                    (vehicle % self.raw_shards, lo_ms, hi_ms),
                )
            )
        return layout.track_of(
            vehicle_id,
            vehicle,
            layout.decode_blobs(chunks, self._where, self.decoded)
            + layout.decode_blobs(raw, self._where),
            start,
            end,
            limit=limit,
            after=after,
        )

    def area(
        self,
        cells: Collection[int],
        start: float,
        end: float,
        *,
        limit: int,
        after: tuple[str, float] | None = None,
    ) -> AreaPage:
        lo_ms, hi_ms = layout.ms_range(start, end)
        query = """SELECT DISTINCT v.name, c.vehicle, c.bucket
                   FROM chunks c JOIN vehicles v ON v.id = c.vehicle
                   WHERE (c.vehicle, c.bucket) IN (
                       SELECT vehicle, bucket FROM chunk_cells
                       WHERE cell IN (SELECT value FROM json_each(?)) AND bucket BETWEEN ? AND ?)
                   AND c.t1 >= ? AND c.t0 < ?"""
        params: list[Any] = [json.dumps([int(cell) for cell in cells]), *layout.buckets(start, end)]
        params += [lo_ms, hi_ms]
        if after is not None:
            # Vehicles before the cursor's are on earlier pages: not even read.
            query += " AND v.name >= ?"
            params.append(after[0])
        wanted = np.fromiter(cells, np.uint64, len(cells))
        with self._database.snapshot() as connection:
            candidates = connection.execute(query + " ORDER BY v.name", params).fetchall()
            parts = layout.decode_blobs(self._raw_blobs(connection, lo_ms, hi_ms), self._where)
            found = 0
            for name, rows in itertools.groupby(candidates, key=lambda row: row[0]):
                # Vehicle by vehicle in page order, only until the page is full: a page
                # of a busy area reads a few vehicles' chunks, not every one of them.
                chunks = list(rows)
                buckets = [bucket for _, _, bucket in chunks]
                decoded = layout.decode_blobs(
                    self._chunk_blobs(connection, chunks[0][1], buckets),
                    self._where,
                    self.decoded,
                )
                parts += decoded
                since = start
                if after is not None and name == after[0]:
                    since = max(start, math.nextafter(after[1], math.inf))  # ts > after
                found += sum(layout.area_matches(part, wanted, since, end) for part in decoded)
                if found > limit:
                    break
            names = self._names_of(
                connection, {int(v) for p in parts for v in np.unique(p.vehicle)}
            )
        return layout.area_page(
            parts, names, cells, start, end, resolution=self.resolution, limit=limit, after=after
        )

    def stats(self) -> StoreStats:
        """Positions kept, and the bytes of the file and its write-ahead log."""
        with self._database.snapshot() as connection:
            row = connection.execute("SELECT value FROM counts WHERE name = 'positions'").fetchone()
        return StoreStats(positions=int(row[0]), bytes_on_disk=self._database.size_on_disk())

    def close(self) -> None:
        """Close the idle connections now; one in use is closed when its query returns."""
        self._database.close()

    # -- compaction ------------------------------------------------------------------

    def _compact_step(self, before: float) -> int:
        """Append up to :data:`COMPACT_STEP_POSITIONS` raw positions to their chunks as new
        segments, in one transaction; 0 when nothing is left.

        Batches are taken shard by shard, so that a vehicle's positions of a compaction
        are mostly one segment; a kept segment is neither read nor encoded again.
        """
        with self._database.write() as connection:
            batches = connection.execute(
                "SELECT id, size FROM raw WHERE t1 < ? ORDER BY shard, id LIMIT ?",
                (layout.ms(before), COMPACT_STEP_BATCHES),
            ).fetchall()
            if not batches:
                return 0
            sizes = np.cumsum([size for _, size in batches])
            take = max(1, int(np.searchsorted(sizes, COMPACT_STEP_POSITIONS, side="right")))
            taken = [batch_id for batch_id, _ in batches[:take]]
            ids = json.dumps(taken)
            blobs = _column(
                connection.execute(
                    "SELECT data FROM raw WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                    (ids,),
                )
            )
            (seq,) = connection.execute(
                "UPDATE counts SET value = value + 1 WHERE name = 'compactions' RETURNING value"
            ).fetchone()
            chunks = layout.segments(layout.decode_blobs(blobs, self._where), self.resolution)
            self._insert_chunks(connection, chunks, seq)
            connection.execute(
                "DELETE FROM raw WHERE id IN (SELECT value FROM json_each(?))", (ids,)
            )
            return int(sizes[take - 1])

    def seal(self, before: float, *, limit: int) -> int:
        """Merge the segments of up to ``limit`` chunks whose bucket is over (entirely
        before ``before``) into one each, in one transaction; 0 when none is left."""
        with self._database.write() as connection:
            keys = connection.execute(
                """SELECT DISTINCT vehicle, bucket FROM chunks
                   WHERE seq > 0 AND bucket < ? LIMIT ?""",
                (layout.bucket_before(before), limit),
            ).fetchall()
            if not keys:
                return 0
            rows = connection.execute(
                """SELECT vehicle, bucket, data FROM chunks WHERE (vehicle, bucket) IN (
                       SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]')
                       FROM json_each(?))
                   ORDER BY vehicle, bucket, seq""",
                (json.dumps(keys),),
            ).fetchall()
            alone = [
                key
                for key, group in itertools.groupby(rows, lambda row: row[:2])
                if len(list(group)) == 1
            ]
            connection.executemany(  # a chunk of one segment is sealed as it is
                "UPDATE chunks SET seq = 0 WHERE vehicle = ? AND bucket = ?", alone
            )
            single = set(alone)
            merged = [row for row in rows if row[:2] not in single]
            chunks = layout.seal(
                layout.decode_blobs([bytes(row[2]) for row in merged], self._where)
            )
            connection.executemany(
                "DELETE FROM chunks WHERE vehicle = ? AND bucket = ?",
                ((chunk.vehicle, chunk.bucket) for chunk in chunks),
            )
            self._insert_chunks(connection, chunks, 0)
            return len(keys)

    @staticmethod
    def _insert_chunks(
        connection: sqlite3.Connection, chunks: list[layout.Chunk], seq: int
    ) -> None:
        """Keep ``chunks`` as segments ``seq`` with their cells (a chunk's cell rows
        cover every segment's cells: they are only added to until the chunk expires)."""
        connection.executemany(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (c.vehicle, c.bucket, seq, c.t0_ms, c.t1_ms, c.size, _cells_blob(c.cells), c.blob)
                for c in chunks
            ),
        )
        connection.executemany(
            "INSERT OR IGNORE INTO chunk_cells VALUES (?, ?, ?)",
            ((cell, c.bucket, c.vehicle) for c in chunks for cell in c.cells),
        )

    @staticmethod
    def _count(connection: sqlite3.Connection, positions: int) -> None:
        if positions:
            connection.execute(
                "UPDATE counts SET value = value + ? WHERE name = 'positions'", (positions,)
            )

    # -- vehicles --------------------------------------------------------------------

    def _numbers(self, connection: sqlite3.Connection, vehicle_ids: list[str]) -> list[int]:
        """The number of each vehicle id, numbering new ones in the caller's transaction."""
        new = sorted(set(vehicle_ids) - self._vehicles.keys())
        if new:
            connection.executemany(
                "INSERT OR IGNORE INTO vehicles (name) VALUES (?)", ((name,) for name in new)
            )
            self._remember(
                connection.execute(
                    "SELECT name, id FROM vehicles WHERE name IN (SELECT value FROM json_each(?))",
                    (json.dumps(new),),
                ).fetchall()
            )
        return list(map(self._vehicles.__getitem__, vehicle_ids))

    def _known_number(self, connection: sqlite3.Connection, vehicle_id: str) -> int | None:
        if vehicle_id not in self._vehicles:
            rows = connection.execute(
                "SELECT name, id FROM vehicles WHERE name = ?", (vehicle_id,)
            ).fetchall()
            self._remember(rows)
        return self._vehicles.get(vehicle_id)

    def _names_of(self, connection: sqlite3.Connection, numbers: set[int]) -> dict[int, str]:
        unknown = list(numbers - self._names.keys())
        if unknown:
            rows = connection.execute(
                "SELECT name, id FROM vehicles WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(unknown),),
            ).fetchall()
            self._remember(rows)
        return {number: self._names[number] for number in numbers}

    def _remember(self, rows: list[tuple[str, int]]) -> None:
        with self._lock:
            for name, number in rows:
                self._vehicles[name] = number
                self._names[number] = name

    # -- plumbing --------------------------------------------------------------------

    @staticmethod
    def _chunk_blobs(
        connection: sqlite3.Connection, vehicle: int, buckets: list[int]
    ) -> list[bytes]:
        return _column(
            connection.execute(
                """SELECT data FROM chunks WHERE vehicle = ?
                   AND bucket IN (SELECT value FROM json_each(?)) ORDER BY bucket, seq""",
                (vehicle, json.dumps(buckets)),
            )
        )

    def _raw_blobs(self, connection: sqlite3.Connection, lo_ms: int, hi_ms: int) -> list[bytes]:
        return _column(
            connection.execute(
                "SELECT data FROM raw WHERE t1 >= ? AND t0 < ? ORDER BY id", (lo_ms, hi_ms)
            )
        )


def _cells_blob(cells: list[int]) -> bytes:
    return np.array(cells, dtype=np.int64).tobytes()


def _column(cursor: sqlite3.Cursor) -> list[bytes]:
    return [bytes(row[0]) for row in cursor]
