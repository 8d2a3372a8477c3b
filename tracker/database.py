"""Durable tables: one SQLite file or one PostgreSQL database, shared by every component.

History, zones and alerts keep their tables in the same database
(:attr:`TrackerConfig.database_target <tracker.config.TrackerConfig.database_target>`).
This module is what they share, so that none of them reinvents it:

* :class:`SqliteDatabase`: a local file in WAL mode (readers never wait for the writer),
  ``synchronous=FULL`` (a returned commit survives a power cut), with connections *lent*
  to one thread at a time. Closing never closes a connection a thread is using: SQLite's
  C library may crash the process (SIGSEGV) when a connection is closed under a
  running statement.
* :class:`PostgresDatabase`: a small pool of psycopg 3 connections (its synchronous API,
  from worker threads), every wait on the server under a deadline: ``connect_timeout``,
  ``statement_timeout`` on the server, and a client-side deadline on each network wait
  for a server that stopped answering altogether.
* :class:`Migrations`: a component's versioned schema, applied at start by
  ``database.migrating(migrations)``, under a write transaction (SQLite) or an advisory
  lock (PostgreSQL), so instances starting together migrate once; a database whose
  version is newer than the code is refused. Versions are kept per component in
  ``schema_migrations (component, version, applied_at)``.

Every failure is a :class:`DatabaseError` naming the database (never a password).
Everything here is synchronous: call it from worker threads (``trio.to_thread``), never
from the event loop. Tables of a component are prefixed with its name (``zones_...``),
except the history tables of an SQLite file made before this module (``raw``,
``chunks``...).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, NamedTuple

import psycopg

from tracker.config import without_password

__all__ = [
    "POSTGRES_SCHEMES",
    "DatabaseError",
    "Migrations",
    "PostgresDatabase",
    "SqliteDatabase",
    "open_database",
]

log = logging.getLogger(__name__)

POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")

SQLITE_BUSY_TIMEOUT_S: Final = 10.0
"""Longest wait for another connection's write lock (several components, or a second
process, writing to one file)."""
SQLITE_WAL_LIMIT_BYTES: Final = 4 * 1024 * 1024
"""The write-ahead log is cut back to this after a checkpoint (a large write transaction
grows it; SQLite would otherwise keep it that large on disk for good)."""

PG_CONNECT_TIMEOUT_S: Final = 5
"""Unless the URL says otherwise (``?connect_timeout=``; libpq takes whole seconds, >= 2)."""
PG_TIMEOUT_S: Final = 30.0
"""Longest statement the server runs for us (``statement_timeout``, ``lock_timeout``)."""
PG_WAIT_FACTOR: Final = 1.5
"""A client-side wait lasts at most this many times the statement timeout: past the
server's own timeout, so that normally the server cancels first (a clean error), and
this only ends the wait on a server that is gone."""
PG_IDLE_IN_TRANSACTION_S: Final = 60
"""A client that dies inside a transaction releases its locks after this long."""
PG_POOL_SIZE: Final = 8
PG_MIGRATION_LOCK: Final = 0x7472616B_6D696772
"""Advisory lock key ("trakmigr") held while any component migrates."""


class DatabaseError(Exception):
    """The database cannot do what was asked (unreachable, corrupt, a newer schema...)."""


class Migrations(NamedTuple):
    """A component's schema as its ordered versions.

    ``steps[n]`` are the SQL statements taking the component from version n to n + 1;
    a released step is never edited, a change is a new step. ``legacy_table`` names the
    table (with a ``version`` column) where the component kept its versions before
    ``schema_migrations`` existed: adopted, then dropped, on the first migration.
    """

    component: str
    steps: Sequence[Sequence[str]]
    legacy_table: str | None = None

    @property
    def version(self) -> int:
        """The version this code brings the component to."""
        return len(self.steps)


def open_database(target: str) -> SqliteDatabase | PostgresDatabase:
    """The database ``target`` names: ``postgresql://...`` (or ``postgres://``), or
    ``sqlite:PATH`` or a bare file path. Nothing is connected yet.

    Raises ValueError for an empty target or another scheme.
    """
    stripped = target.strip()
    if stripped.lower().startswith(POSTGRES_SCHEMES):
        return PostgresDatabase(stripped)
    path = stripped.removeprefix("sqlite:")
    if "://" in stripped or not path.strip():
        raise ValueError(
            f"database target {without_password(target)!r} is neither postgresql://... "
            "nor sqlite:PATH nor a file path"
        )
    return SqliteDatabase(path)


# --- the migration runner (both databases) ---------------------------------------------


class _Dialect(NamedTuple):
    create: str
    current: str
    record: str
    has_table: str


_SQLITE = _Dialect(
    create="""CREATE TABLE IF NOT EXISTS schema_migrations (
                  component TEXT NOT NULL,
                  version INTEGER NOT NULL,
                  applied_at REAL NOT NULL,
                  PRIMARY KEY (component, version))""",
    current="SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = ?",
    record="INSERT INTO schema_migrations (component, version, applied_at) VALUES (?, ?, ?)",
    has_table="SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
)
_POSTGRES = _Dialect(
    create="""CREATE TABLE IF NOT EXISTS schema_migrations (
                  component text NOT NULL,
                  version integer NOT NULL,
                  applied_at double precision NOT NULL,
                  PRIMARY KEY (component, version))""",
    current="SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = %s",
    record="INSERT INTO schema_migrations (component, version, applied_at) VALUES (%s, %s, %s)",
    has_table="SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() "
    "AND tablename = %s",
)


def _run_migrations(
    execute: Callable[..., Any], dialect: _Dialect, migrations: Migrations, where: str
) -> None:
    """Bring ``migrations.component`` to its version, inside the caller's transaction."""
    component = migrations.component
    execute(dialect.create)
    current = int(execute(dialect.current, (component,)).fetchone()[0])
    legacy = migrations.legacy_table
    if not current and legacy and execute(dialect.has_table, (legacy,)).fetchone()[0]:
        versions = [int(row[0]) for row in execute(f"SELECT version FROM {legacy}").fetchall()]
        for version in sorted(versions):
            execute(dialect.record, (component, version, time.time()))
        execute(f"DROP TABLE {legacy}")  # an older tracker now refuses the database
        current = max(versions, default=0)
    if current > migrations.version:
        raise DatabaseError(
            f"{where} has {component} schema version {current}; this tracker knows up to "
            f"{migrations.version}: upgrade the tracker"
        )
    for version in range(current, migrations.version):
        for statement in migrations.steps[version]:
            execute(statement)
        execute(dialect.record, (component, version + 1, time.time()))
        log.info("%s: %s schema migrated to version %d", where, component, version + 1)


# --- SQLite ------------------------------------------------------------------------------


class SqliteDatabase:
    """One SQLite file at ``path`` (created with its directory by :meth:`migrating`).

    Connections are opened when needed and lent to one thread at a time
    (:meth:`write`, :meth:`snapshot`): not kept per thread, since Trio's worker threads
    come and go and a connection kept per thread would stay open until :meth:`close`.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S
    ) -> None:
        self.path = os.fspath(path)
        self.where = f"database file {self.path}"
        """How errors name the database (a component may set its own)."""
        self._busy_timeout_s = busy_timeout_s
        self._idle: list[sqlite3.Connection] = []  # connections no thread is using
        self._closed = False
        self._lock = threading.Lock()

    @contextmanager
    def migrating(self, migrations: Migrations) -> Iterator[sqlite3.Connection]:
        """Create the file and its directory if missing, bring ``migrations`` up to date,
        and yield the connection in the same write transaction (for what a component
        sets up beyond its tables); all of it commits together or not at all."""
        directory = os.path.dirname(self.path)
        try:
            if directory:
                os.makedirs(directory, exist_ok=True)
        except OSError as error:
            raise DatabaseError(f"{self.where}: {error}") from error
        with self.write() as connection:
            _run_migrations(connection.execute, _SQLITE, migrations, self.where)
            yield connection

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A connection in a write transaction, committed on success, rolled back on any
        exception. Taken at once (``BEGIN IMMEDIATE``): no upgrade from read to write
        that could fail half-way."""
        with self._transaction("BEGIN IMMEDIATE") as connection:
            yield connection

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A connection in a read transaction: every SELECT in it sees one snapshot of
        the file (WAL), however writers commit meanwhile."""
        with self._transaction("BEGIN DEFERRED") as connection:
            yield connection

    def size_on_disk(self) -> int:
        """Bytes of the file and its write-ahead log."""
        return sum(_file_size(self.path + suffix) for suffix in ("", "-wal"))

    def close(self) -> None:
        """Close the idle connections now; one in use is closed when it is given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        connection = self._borrow()
        try:
            try:
                connection.execute(begin)
            except sqlite3.Error as error:
                raise DatabaseError(f"{self.where}: {error}") from error
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException as error:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise DatabaseError(f"{self.where}: {error}") from error
                raise
        finally:
            self._give_back(connection)

    def _borrow(self) -> sqlite3.Connection:
        """A connection for this thread alone until :meth:`_give_back` (idle, or new)."""
        with self._lock:
            if self._closed:
                raise DatabaseError(f"{self.where}: closed")
            if self._idle:
                return self._idle.pop()
        # isolation_level=None: transactions are ours (BEGIN ... COMMIT), not the
        # module's implicit ones; check_same_thread=False because a connection is lent
        # to one thread at a time, not always the same one.
        try:
            connection = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as error:
            raise DatabaseError(f"{self.where}: {error}") from error
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
        except sqlite3.Error as error:
            connection.close()
            raise DatabaseError(f"{self.where}: {error}") from error
        return connection

    def _give_back(self, connection: sqlite3.Connection) -> None:
        """Return a lent connection; closed at once if the database was closed meanwhile."""
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        connection.close()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


# --- PostgreSQL --------------------------------------------------------------------------


class PostgresDatabase:
    """A PostgreSQL database at ``url`` (``postgresql://user:pw@host/db``).

    At most ``pool_size`` connections, made when needed, each lent to one thread at a
    time. ``timeout_s`` bounds every statement on the server and, a little later, every
    wait on it. The URL's own options (``?options=-c search_path=...``) are kept.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = PG_TIMEOUT_S,
        pool_size: int = PG_POOL_SIZE,
        application_name: str = "tracker",
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.where = f"PostgreSQL at {without_password(url)}"
        """How errors name the database."""
        self._application_name = application_name
        self._pool = _Pool(self._connect, pool_size, timeout_s)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit mode; any database error (and a pool whose
        connections all stayed busy) becomes a :class:`DatabaseError` naming the server."""
        try:
            with self._pool.connection() as connection:
                yield connection
        except psycopg.Error as error:
            raise DatabaseError(f"{self.where}: {_first_line(error)}") from error
        except _PoolExhausted as error:
            raise DatabaseError(f"{self.where}: {error}") from error

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction, committed on success."""
        with self.connection() as connection, connection.transaction():
            yield connection

    @contextmanager
    def snapshot(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a read-only transaction that sees one snapshot
        (REPEATABLE READ): what commits meanwhile is neither half-seen nor seen twice."""
        with self.transaction() as connection:
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield connection

    @contextmanager
    def migrating(self, migrations: Migrations) -> Iterator[psycopg.Connection[Any]]:
        """Bring ``migrations`` up to date under the migration lock, and yield the
        connection in the same transaction; all of it commits together or not at all.

        DDL is transactional in PostgreSQL; an instance starting meanwhile waits for the
        lock, then finds the migration done."""
        with self.transaction() as connection:
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (PG_MIGRATION_LOCK,))
            _run_migrations(connection.execute, _POSTGRES, migrations, self.where)
            yield connection

    def close(self) -> None:
        """Close the idle connections (one in use is closed when given back)."""
        self._pool.close()

    def _connect(self) -> psycopg.Connection[Any]:
        given = psycopg.conninfo.conninfo_to_dict(self.url)
        timeout_ms = max(1, round(self.timeout_s * 1000))
        # The URL's own options (say -c search_path=...) come first; our deadlines win.
        options = (
            f"{given.get('options', '')} "
            f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms} "
            f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_S}s"
        ).strip()
        connection = _DeadlineConnection.connect(
            self.url,
            autocommit=True,
            connect_timeout=given.get("connect_timeout", PG_CONNECT_TIMEOUT_S),
            application_name=given.get("application_name", self._application_name),
            options=options,
        )
        connection.wait_timeout_s = self.timeout_s * PG_WAIT_FACTOR
        return connection


class _DeadlineConnection(psycopg.Connection[Any]):
    """A connection whose every network wait ends within ``wait_timeout_s``.

    ``statement_timeout`` is enforced by the server, so it cannot end a wait on a server
    that has stopped (frozen, or gone without closing the socket); psycopg runs every
    query, COPY and commit through :meth:`wait`, which takes a timeout but is given none.
    """

    wait_timeout_s: float = PG_TIMEOUT_S * PG_WAIT_FACTOR

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        return super().wait(gen, interval, self.wait_timeout_s if timeout is None else timeout)


class _PoolExhausted(Exception):
    """Every connection of the pool stayed busy for the whole wait."""


class _Pool:
    """At most ``size`` connections, lent to one thread at a time, made when needed.

    Not a connection per thread: Trio's worker threads come and go, and connections kept
    per thread would outlive theirs. Not psycopg_pool either: its background threads
    reconnect on their own schedule and turn a failure into "couldn't get a connection
    after N s", where we want the server's own error at once. A connection that failed
    with an OperationalError (a lost server, a wait past its deadline: its state is
    unknown) is closed with every idle one (they are most likely dead too), so the next
    call connects afresh instead of failing once per stale connection.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], size: int, wait_s: float
    ) -> None:
        self._connect = connect
        self._size = size
        self._wait_s = wait_s
        self._idle: list[psycopg.Connection[Any]] = []
        self._open = 0
        self._closed = False
        self._changed = threading.Condition()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        connection = self._take()
        failed = False
        try:
            yield connection
        except psycopg.OperationalError:
            failed = True
            self._close_idle()
            raise
        finally:
            self._give_back(connection, keep=not failed)

    def close(self) -> None:
        """Close the idle connections; one in use is closed when given back."""
        with self._changed:
            self._closed = True
        self._close_idle()

    def _take(self) -> psycopg.Connection[Any]:
        with self._changed:
            if not self._changed.wait_for(
                lambda: self._idle or self._open < self._size, self._wait_s
            ):
                raise _PoolExhausted(f"all {self._size} connections busy for {self._wait_s:g} s")
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._changed:
                self._open -= 1
                self._changed.notify()
            raise

    def _give_back(self, connection: psycopg.Connection[Any], *, keep: bool) -> None:
        idle = connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if not keep or connection.broken or not idle:
            connection.close()
        with self._changed:
            if self._closed and not connection.closed:
                connection.close()
            if connection.closed:
                self._open -= 1
            else:
                self._idle.append(connection)
            self._changed.notify()

    def _close_idle(self) -> None:
        with self._changed:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._changed.notify_all()
        for connection in idle:
            connection.close()


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
