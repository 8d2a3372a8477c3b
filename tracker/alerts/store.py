"""Where alerts are kept: the event log, webhook subscriptions, cursors and dead letters.

:class:`AlertStore` keeps the ``alerts`` component's tables in the tracker's database
(``TrackerConfig.database_target``: one SQLite file, or the PostgreSQL database several
instances share; :mod:`tracker.database` lends the connections and runs the migrations).
It is synchronous and only ever called from worker threads.

* ``alerts_events``: one row per event; its ``id`` is given by the database when the row
  is inserted (SQLite ``AUTOINCREMENT``, a PostgreSQL identity: never reused). On
  PostgreSQL an append first takes ``LOCK TABLE alerts_events IN EXCLUSIVE MODE`` (it
  waits for other writers, not for readers) so that instances commit their ids in
  order: a reader that has seen id *n* never later finds a committed id below *n*.
  Columns: the deciding position's index cell (area filters), zone and kind
  (subscription filters), the event as msgspec JSON.
* ``alerts_meta``: ``expired_through``, the highest id retention deleted: a cursor at or
  below it has missed events (a ``gap``), one above it has not.
* ``alerts_webhooks``: subscriptions, their secret and their cursor (the last event
  settled: delivered or dead-lettered).
* ``alerts_dead_letters``: events a webhook did not take after every attempt.

Every failure is a :class:`~tracker.database.DatabaseError` naming the database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from tracker.database import Migrations, PostgresDatabase, SqliteDatabase, open_database
from tracker.zones.events import ZoneEvent

__all__ = [
    "INSERT_ROWS",
    "POSTGRES_MIGRATIONS",
    "SQLITE_MIGRATIONS",
    "AlertStore",
    "DeadLetter",
    "NewEvent",
    "StoredEvent",
    "StoredWebhook",
]

SQLITE_MIGRATIONS: Final = Migrations(
    "alerts",
    (
        (
            """CREATE TABLE alerts_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                logged REAL NOT NULL,
                cell INTEGER NOT NULL,
                zone TEXT NOT NULL,
                kind TEXT NOT NULL,
                data BLOB NOT NULL
            )""",
            "CREATE INDEX alerts_events_logged ON alerts_events (logged)",
            "CREATE TABLE alerts_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            "INSERT INTO alerts_meta (key, value) VALUES ('expired_through', 0)",
            """CREATE TABLE alerts_webhooks (
                id TEXT PRIMARY KEY,
                url TEXT NOT NULL,
                zones TEXT NOT NULL,
                kinds TEXT NOT NULL,
                secret TEXT NOT NULL,
                created REAL NOT NULL,
                cursor INTEGER NOT NULL
            )""",
            """CREATE TABLE alerts_dead_letters (
                webhook TEXT NOT NULL,
                event INTEGER NOT NULL,
                attempts INTEGER NOT NULL,
                error TEXT NOT NULL,
                at REAL NOT NULL,
                PRIMARY KEY (webhook, event)
            )""",
        ),
    ),
)
POSTGRES_MIGRATIONS: Final = Migrations(
    "alerts",
    (
        (
            """CREATE TABLE alerts_events (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                logged double precision NOT NULL,
                cell bigint NOT NULL,
                zone text NOT NULL,
                kind text NOT NULL,
                data bytea NOT NULL
            )""",
            "CREATE INDEX alerts_events_logged ON alerts_events (logged)",
            "CREATE TABLE alerts_meta (key text PRIMARY KEY, value bigint NOT NULL)",
            "INSERT INTO alerts_meta (key, value) VALUES ('expired_through', 0)",
            """CREATE TABLE alerts_webhooks (
                id text PRIMARY KEY,
                url text NOT NULL,
                zones text NOT NULL,
                kinds text NOT NULL,
                secret text NOT NULL,
                created double precision NOT NULL,
                cursor bigint NOT NULL
            )""",
            """CREATE TABLE alerts_dead_letters (
                webhook text NOT NULL,
                event bigint NOT NULL,
                attempts integer NOT NULL,
                error text NOT NULL,
                at double precision NOT NULL,
                PRIMARY KEY (webhook, event)
            )""",
        ),
    ),
)
"""The alert tables' versions, per database (the same tables, each in its own types)."""

INSERT_ROWS: Final = 1_000
"""Events per ``INSERT`` statement (5 parameters each: well within SQLite's 32,766)."""

_decoder = msgspec.json.Decoder(ZoneEvent)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class NewEvent:
    """An event on its way into the log, with the index cell of its position."""

    cell: int
    event: ZoneEvent


@dataclass(frozen=True)
class StoredEvent:
    """An event as the log holds it: its id, cell and the event."""

    id: int
    cell: int
    event: ZoneEvent


@dataclass(frozen=True)
class StoredWebhook:
    """A webhook subscription as stored (``zones``/``kinds`` empty: any)."""

    id: str
    url: str
    zones: tuple[str, ...]
    kinds: tuple[str, ...]
    secret: str
    created: float
    cursor: int


@dataclass(frozen=True)
class DeadLetter:
    """An event a webhook did not take: how often it was tried and the last error."""

    webhook: str
    event: int
    attempts: int
    error: str
    at: float


class _Sql:
    """A connection of either database, taking SQL written with ``?`` placeholders."""

    def __init__(self, connection: Any, postgres: bool) -> None:
        self._connection = connection
        self._postgres = postgres

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self._postgres:
            sql = sql.replace("?", "%s")
        return self._connection.execute(sql, params)


class AlertStore:
    """The alert tables in ``database``; :meth:`migrate` must run once first."""

    def __init__(self, database: SqliteDatabase | PostgresDatabase) -> None:
        self.database = database
        self._postgres = isinstance(database, PostgresDatabase)

    @classmethod
    def open(cls, target: str) -> AlertStore:
        """The store in the database ``target`` names (nothing connected yet)."""
        return cls(open_database(target))

    @property
    def shared(self) -> bool:
        """Whether other instances may write to the same log (PostgreSQL)."""
        return self._postgres

    def migrate(self) -> None:
        """Create or upgrade the alert tables."""
        migrations = POSTGRES_MIGRATIONS if self._postgres else SQLITE_MIGRATIONS
        with self.database.migrating(migrations):
            pass

    def close(self) -> None:
        """Close the database's idle connections."""
        self.database.close()

    @contextmanager
    def _write(self) -> Iterator[_Sql]:
        transaction = (
            self.database.transaction()
            if isinstance(self.database, PostgresDatabase)
            else self.database.write()
        )
        with transaction as connection:
            yield _Sql(connection, self._postgres)

    @contextmanager
    def _read(self) -> Iterator[_Sql]:
        with self.database.snapshot() as connection:
            yield _Sql(connection, self._postgres)

    # --- the event log -------------------------------------------------------------------

    def append(self, events: Sequence[NewEvent], logged: float) -> list[StoredEvent]:
        """Log ``events`` in one transaction, in order; what was stored, with its ids.

        One multi-row ``INSERT`` per :data:`INSERT_ROWS` events, not one per event: each
        statement releases the GIL and takes it back, and a worker thread that wants the
        GIL back waits for the busy event loop's switch interval (5 ms), so a commit of
        a tick's hundred events took 0.1-0.3 s under ingest load one row at a time."""
        if not events:
            return []
        rows = [
            (logged, new.cell, new.event.zone, new.event.kind, _encoder.encode(new.event))
            for new in events
        ]
        ids: list[int] = []
        with self._write() as sql:
            if self._postgres:
                sql.execute("LOCK TABLE alerts_events IN EXCLUSIVE MODE")
            for first in range(0, len(rows), INSERT_ROWS):
                ids += self._insert(sql, rows[first : first + INSERT_ROWS])
        return [StoredEvent(i, new.cell, new.event) for i, new in zip(ids, events, strict=True)]

    def _insert(self, sql: _Sql, rows: list[tuple[float, int, str, str, bytes]]) -> list[int]:
        """Insert ``rows`` with one statement; their ids, in the order of ``rows``.

        SQLite: the ids of one statement's rows are consecutive (``AUTOINCREMENT`` gives
        each row one more than the largest id so far, and this transaction is the only
        writer), so the last one (``lastrowid``) gives them all without reading a row
        back (each row read is one more GIL round trip). PostgreSQL: the identity is
        drawn row by row in ``VALUES`` order under the table lock, so the returned ids
        sorted are the rows' ids in order."""
        values = ", ".join(["(?, ?, ?, ?, ?)"] * len(rows))
        params = [field for row in rows for field in row]
        insert = f"INSERT INTO alerts_events (logged, cell, zone, kind, data) VALUES {values}"
        if self._postgres:
            return sorted(int(row[0]) for row in sql.execute(insert + " RETURNING id", params))
        last = int(sql.execute(insert, params).lastrowid)
        return list(range(last - len(rows) + 1, last + 1))

    def read(self, after: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events with ids above ``after``, in id order."""
        with self._read() as sql:
            rows = sql.execute(
                "SELECT id, cell, data FROM alerts_events WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [StoredEvent(row[0], row[1], _decoder.decode(bytes(row[2]))) for row in rows]

    def bounds(self) -> tuple[int, int]:
        """The first id the log may still hold (every id below it was deleted by
        retention) and the last id committed (0 for a log that never had one)."""
        with self._read() as sql:
            expired = int(
                sql.execute(
                    "SELECT value FROM alerts_meta WHERE key = 'expired_through'"
                ).fetchone()[0]
            )
            newest = sql.execute("SELECT max(id) FROM alerts_events").fetchone()[0]
        return expired + 1, max(expired, int(newest or 0))

    def expire(self, before: float, keep: int, *, limit: int) -> int:
        """Delete up to ``limit`` of the oldest events logged before ``before`` or beyond
        the newest ``keep``; how many were deleted."""
        with self._write() as sql:
            row = sql.execute(
                "SELECT id FROM alerts_events ORDER BY id DESC LIMIT 1 OFFSET ?", (keep,)
            ).fetchone()
            beyond = -1 if row is None else int(row[0])
            doomed = sql.execute(
                "SELECT id FROM alerts_events WHERE logged < ? OR id <= ? ORDER BY id LIMIT ?",
                (before, beyond, limit),
            ).fetchall()
            if not doomed:
                return 0
            last = int(doomed[-1][0])
            deleted = sql.execute("DELETE FROM alerts_events WHERE id <= ?", (last,)).rowcount
            sql.execute(
                "UPDATE alerts_meta SET value = ? WHERE key = 'expired_through' AND value < ?",
                (last, last),
            )
        return int(deleted)

    # --- webhooks ------------------------------------------------------------------------

    def add_webhook(self, hook: StoredWebhook) -> None:
        """Store a new subscription."""
        with self._write() as sql:
            sql.execute(
                "INSERT INTO alerts_webhooks (id, url, zones, kinds, secret, created, cursor) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    hook.id,
                    hook.url,
                    json.dumps(hook.zones),
                    json.dumps(hook.kinds),
                    hook.secret,
                    hook.created,
                    hook.cursor,
                ),
            )

    def webhooks(self) -> list[StoredWebhook]:
        """Every subscription, oldest first."""
        with self._read() as sql:
            rows = sql.execute(
                "SELECT id, url, zones, kinds, secret, created, cursor FROM alerts_webhooks "
                "ORDER BY created, id"
            ).fetchall()
        return [
            StoredWebhook(
                id=row[0],
                url=row[1],
                zones=tuple(json.loads(row[2])),
                kinds=tuple(json.loads(row[3])),
                secret=row[4],
                created=row[5],
                cursor=row[6],
            )
            for row in rows
        ]

    def delete_webhook(self, webhook: str) -> bool:
        """Forget a subscription and its dead letters; whether it existed."""
        with self._write() as sql:
            sql.execute("DELETE FROM alerts_dead_letters WHERE webhook = ?", (webhook,))
            deleted = sql.execute("DELETE FROM alerts_webhooks WHERE id = ?", (webhook,)).rowcount
        return bool(deleted)

    def save_cursors(self, cursors: dict[str, int]) -> None:
        """Remember how far each webhook has settled (never moves a cursor back)."""
        with self._write() as sql:
            for webhook, cursor in cursors.items():
                sql.execute(
                    "UPDATE alerts_webhooks SET cursor = ? WHERE id = ? AND cursor < ?",
                    (cursor, webhook, cursor),
                )

    def add_dead_letter(self, letter: DeadLetter, *, keep: int) -> int:
        """Keep a dead letter, and at most ``keep`` per webhook (the oldest go first);
        how many older ones were removed to make room."""
        with self._write() as sql:
            sql.execute(
                "INSERT INTO alerts_dead_letters (webhook, event, attempts, error, at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (webhook, event) DO UPDATE SET "
                "attempts = excluded.attempts, error = excluded.error, at = excluded.at",
                (letter.webhook, letter.event, letter.attempts, letter.error, letter.at),
            )
            removed = sql.execute(
                "DELETE FROM alerts_dead_letters WHERE webhook = ? AND event <= ("
                "SELECT event FROM alerts_dead_letters WHERE webhook = ? "
                "ORDER BY event DESC LIMIT 1 OFFSET ?)",
                (letter.webhook, letter.webhook, keep),
            ).rowcount
        return int(removed)

    def dead_letters(self, webhook: str, after: int, limit: int) -> list[DeadLetter]:
        """A webhook's dead letters with event ids above ``after``, oldest first."""
        with self._read() as sql:
            rows = sql.execute(
                "SELECT webhook, event, attempts, error, at FROM alerts_dead_letters "
                "WHERE webhook = ? AND event > ? ORDER BY event LIMIT ?",
                (webhook, after, limit),
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def remove_dead_letter(self, webhook: str, event: int) -> None:
        """Forget one dead letter (it was delivered after all)."""
        with self._write() as sql:
            sql.execute(
                "DELETE FROM alerts_dead_letters WHERE webhook = ? AND event = ?",
                (webhook, event),
            )
