"""History kept in one local SQLite file: the embedded default, no server to run.

:class:`SqliteStore` implements :class:`~tracker.history.store.HistoryStore` on the layout
every store keeps (:mod:`tracker.history.layout`, ``docs/history.md``): ``raw`` holds one
row per commit (every ping of the commit, one blob), ``chunks`` one row per vehicle and
hour (one blob, its time span, size and cells), and ``chunk_cells`` one row per cell a
chunk touched, keyed ``(cell, bucket, vehicle)`` so that an area query finds its chunks
by an index range per cell.

Files and durability: the database is in WAL mode, so queries (readers) never wait for
the writer nor the writer for them, and ``synchronous=FULL``: each commit is fsynced
before :meth:`SqliteStore.append` returns, so a returned append survives a kill -9 of
the process (which ``NORMAL`` would already give in WAL mode) and a power cut too (which
``NORMAL`` would not). At one group commit per second the fsync is cheap.

Threads: one connection per calling thread, opened lazily: writes (append, compact,
expire) come from one thread, queries from others at the same time, each on a snapshot
(one read transaction), so a compaction committing between reading chunks and raw
batches never hides or doubles positions. Every failure is a
:class:`~tracker.history.store.StoreError` naming the file.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import numpy as np

from tracker.history import codec, layout
from tracker.history.codec import Positions
from tracker.history.store import AreaPage, StoreError, StoreStats, Track
from tracker.pings import Ping

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S: Final = 10.0
"""Longest wait for another connection's write lock (only the writer thread writes, so
this only comes into play with a second process on the same file)."""
COMPACT_STEP_POSITIONS: Final = 200_000
"""Raw positions merged per compaction transaction: short locks, bounded memory."""
COMPACT_STEP_BATCHES: Final = 1_000
WAL_LIMIT_BYTES: Final = 4 * 1024 * 1024
"""The write-ahead log is cut back to this after a checkpoint: a compaction step writes
a few MB to it, which it would otherwise keep on disk for good (4 MB: what SQLite
checks in at anyway, 1,000 pages)."""

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
)
"""Schema versions: ``MIGRATIONS[n]`` takes a file from version n to n + 1."""
VERSION: Final = len(MIGRATIONS)


class SqliteStore:
    """History in the SQLite file at ``path`` (created with its directory if missing).

    Opens connections lazily, one per calling thread; :meth:`migrate` must run once
    before anything else. ``resolution`` is that of a new file; an existing one keeps
    its own (read by :meth:`migrate`).
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int = 7) -> None:
        self.path = os.fspath(path)
        self._where = f"history file {self.path}"  # how errors name the store
        self.resolution = resolution
        self._idle: list[sqlite3.Connection] = []  # connections no thread is using
        self._closed = False
        self._lock = threading.Lock()
        self._vehicles: dict[str, int] = {}
        self._names: dict[int, str] = {}

    # -- the HistoryStore protocol ---------------------------------------------------

    def migrate(self) -> None:
        directory = os.path.dirname(self.path)
        try:
            if directory:
                os.makedirs(directory, exist_ok=True)
        except OSError as error:
            raise StoreError(f"{self._where}: {error}") from error
        with self._write() as connection:
            self._migrate(connection)

    def append(self, pings: Sequence[Ping]) -> None:
        if not pings:
            return
        try:
            with self._write() as connection:
                numbers = self._numbers(connection, [ping.vehicle_id for ping in pings])
                positions = Positions.from_pings(pings, numbers).sorted()
                try:
                    blob = codec.encode(positions)
                except ValueError as error:
                    raise StoreError(f"cannot keep these pings: {error}") from error
                connection.execute(
                    "INSERT INTO raw (t0, t1, size, data) VALUES (?, ?, ?, ?)",
                    (
                        layout.ms(positions.ts.min()),
                        layout.ms(positions.ts.max()),
                        len(positions),
                        blob,
                    ),
                )
        except StoreError:
            # Vehicles numbered in the rolled-back transaction are numbered no more.
            with self._lock:
                self._vehicles.clear()
                self._names.clear()
            raise

    def compact(self, before: float) -> int:
        moved = 0
        while step := self._compact_step(before):
            moved += step
        return moved

    def expire(self, before: float, *, limit: int) -> int:
        before_ms = layout.ms(before)
        with self._write() as connection:
            chunks = connection.execute(
                """SELECT vehicle, bucket, cells FROM chunks
                   WHERE bucket < ? AND t1 < ? LIMIT ?""",
                (int(before // layout.BUCKET_S) + 1, before_ms, limit),
            ).fetchall()
            connection.executemany(
                "DELETE FROM chunk_cells WHERE cell = ? AND bucket = ? AND vehicle = ?",
                (
                    (cell, bucket, vehicle)
                    for vehicle, bucket, cells in chunks
                    for cell in np.frombuffer(cells, np.int64).tolist()
                ),
            )
            connection.executemany(
                "DELETE FROM chunks WHERE vehicle = ? AND bucket = ?",
                ((vehicle, bucket) for vehicle, bucket, _ in chunks),
            )
            batches = connection.execute(
                "DELETE FROM raw WHERE id IN (SELECT id FROM raw WHERE t1 < ? LIMIT ?)",
                (before_ms, limit - len(chunks)),
            ).rowcount
        return len(chunks) + batches

    def track(
        self, vehicle_id: str, start: float, end: float, *, limit: int, after: float | None = None
    ) -> Track:
        lo = start if after is None else max(start, after)
        lo_ms, hi_ms = layout.ms_range(lo, end)
        with self._snapshot() as connection:
            vehicle = self._known_number(connection, vehicle_id)
            if vehicle is None or limit <= 0:
                return layout.track_of(vehicle_id, -1, [], start, end, limit=0)
            spans = [
                layout.ChunkSpan(*row)
                for row in connection.execute(
                    """SELECT bucket, t0, t1, size FROM chunks
                       WHERE vehicle = ? AND bucket BETWEEN ? AND ? AND t1 >= ? AND t0 < ?
                       ORDER BY bucket""",
                    (vehicle, *layout.buckets(lo, end), lo_ms, hi_ms),
                )
            ]
            needed = spans[: layout.chunks_to_read(spans, lo, end, limit)]
            blobs = self._chunk_blobs(connection, vehicle, [span.bucket for span in needed])
            blobs += self._raw_blobs(connection, lo_ms, hi_ms)
        return layout.track_of(
            vehicle_id,
            vehicle,
            layout.decode_blobs(blobs, self._where),
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
        query = """SELECT v.name, c.vehicle, c.bucket
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
        with self._snapshot() as connection:
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
        with self._snapshot() as connection:
            row = connection.execute(
                """SELECT (SELECT coalesce(sum(size), 0) FROM raw)
                        + (SELECT coalesce(sum(size), 0) FROM chunks)"""
            ).fetchone()
        on_disk = sum(_size(self.path + suffix) for suffix in ("", "-wal"))
        return StoreStats(positions=int(row[0]), bytes_on_disk=on_disk)

    def close(self) -> None:
        """Close the idle connections now; one in use is closed when its query returns.

        Never closes a connection another thread is using: SQLite's C library may crash
        the process when a connection is closed under a running statement.
        """
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # -- compaction ------------------------------------------------------------------

    def _compact_step(self, before: float) -> int:
        """Merge up to :data:`COMPACT_STEP_POSITIONS` raw positions into chunks, in one
        transaction; 0 when nothing is left."""
        with self._write() as connection:
            batches = connection.execute(
                "SELECT id, size FROM raw WHERE t1 < ? ORDER BY id LIMIT ?",
                (layout.ms(before), COMPACT_STEP_BATCHES),
            ).fetchall()
            if not batches:
                return 0
            sizes = np.cumsum([size for _, size in batches])
            take = max(1, int(np.searchsorted(sizes, COMPACT_STEP_POSITIONS, side="right")))
            ids = json.dumps([batch_id for batch_id, _ in batches[:take]])
            blobs = _column(
                connection.execute(
                    "SELECT data FROM raw WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                    (ids,),
                )
            )
            chunks = []
            for vehicle, bucket, new in layout.chunk_groups(
                layout.decode_blobs(blobs, self._where), self.resolution
            ):
                old = connection.execute(
                    "SELECT data FROM chunks WHERE vehicle = ? AND bucket = ?", (vehicle, bucket)
                ).fetchone()
                chunks.append(layout.merge_chunk(vehicle, bucket, new, old and old[0]))
            # A merged chunk's cells include the old ones: its cell rows are only added to.
            connection.executemany(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (c.vehicle, c.bucket, c.t0_ms, c.t1_ms, c.size, _cells_blob(c.cells), c.blob)
                    for c in chunks
                ),
            )
            connection.executemany(
                "INSERT OR IGNORE INTO chunk_cells VALUES (?, ?, ?)",
                ((cell, c.bucket, c.vehicle) for c in chunks for cell in c.cells),
            )
            connection.execute(
                "DELETE FROM raw WHERE id IN (SELECT value FROM json_each(?))", (ids,)
            )
            return int(sizes[take - 1])

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
        return [self._vehicles[name] for name in vehicle_ids]

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

    def _migrate(self, connection: sqlite3.Connection) -> None:
        connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                   version INTEGER PRIMARY KEY,
                   applied_at REAL NOT NULL)"""
        )
        row = connection.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = int(row[0])
        if current > VERSION:
            raise StoreError(
                f"{self._where} has schema version {current}; this tracker knows "
                f"up to {VERSION}: upgrade the tracker"
            )
        for version in range(current, VERSION):
            for statement in MIGRATIONS[version]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version + 1, time.time()),
            )
            log.info("history file %s migrated to schema version %d", self.path, version + 1)
        connection.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('resolution', ?)",
            (str(self.resolution),),
        )
        (resolution,) = connection.execute(
            "SELECT value FROM meta WHERE key = 'resolution'"
        ).fetchone()
        self.resolution = int(resolution)

    @staticmethod
    def _chunk_blobs(
        connection: sqlite3.Connection, vehicle: int, buckets: list[int]
    ) -> list[bytes]:
        return _column(
            connection.execute(
                """SELECT data FROM chunks WHERE vehicle = ?
                   AND bucket IN (SELECT value FROM json_each(?))""",
                (vehicle, json.dumps(buckets)),
            )
        )

    def _raw_blobs(self, connection: sqlite3.Connection, lo_ms: int, hi_ms: int) -> list[bytes]:
        return _column(
            connection.execute(
                "SELECT data FROM raw WHERE t1 >= ? AND t0 < ? ORDER BY id", (lo_ms, hi_ms)
            )
        )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection in a write transaction (taken at once: no upgrade
        from read to write that could fail half-way), committed on success."""
        with self._transaction("BEGIN IMMEDIATE") as connection:
            yield connection

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection in a read transaction: every SELECT in it sees one
        snapshot of the file (WAL), however the writer commits meanwhile."""
        with self._transaction("BEGIN DEFERRED") as connection:
            yield connection

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        connection = self._borrow()
        try:
            try:
                connection.execute(begin)
            except sqlite3.Error as error:
                raise StoreError(f"{self._where}: {error}") from error
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException as error:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise StoreError(f"{self._where}: {error}") from error
                raise
        finally:
            self._give_back(connection)

    def _borrow(self) -> sqlite3.Connection:
        """A connection for this thread alone until :meth:`_give_back` (an idle one, or new).

        Lent rather than kept per thread: Trio's worker threads come and go, and a
        connection kept per thread would stay open until :meth:`close`.
        """
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._where}: the store is closed")
            if self._idle:
                return self._idle.pop()
        # isolation_level=None: transactions are ours (BEGIN ... COMMIT), not the
        # module's implicit ones; check_same_thread=False because a connection is lent
        # to one thread at a time, not always the same one.
        connection = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        except sqlite3.Error as error:
            connection.close()
            raise StoreError(f"{self._where}: {error}") from error
        return connection

    def _give_back(self, connection: sqlite3.Connection) -> None:
        """Return a lent connection; closed at once if the store was closed meanwhile."""
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        connection.close()


def _cells_blob(cells: list[int]) -> bytes:
    return np.array(cells, dtype=np.int64).tobytes()


def _column(cursor: sqlite3.Cursor) -> list[bytes]:
    return [bytes(row[0]) for row in cursor]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0
