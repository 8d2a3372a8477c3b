"""What a history store is and what it returns, apart from any database.

A store is synchronous (SQLite's and psycopg's APIs are), and is only ever called from
worker threads by :mod:`tracker.history.writer`: writes from one dedicated thread, in
order; queries from other threads, concurrently with writes. Each implementation keeps
its own connections per thread.

Units: ``ts`` in Unix seconds (kept to the millisecond), ``lat``/``lon`` in degrees,
``speed`` in m/s and ``heading`` in degrees, NaN where the ping did not report one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from tracker.config import without_password
from tracker.database import POSTGRES_SCHEMES, DatabaseError
from tracker.history.decoded import DecodedChunks
from tracker.pings import Ping

__all__ = [
    "AreaPage",
    "HistoryStore",
    "RejectedPings",
    "StoreError",
    "StoreStats",
    "Track",
    "open_store",
]


StoreError = DatabaseError
"""The store cannot do what was asked (unreachable, corrupt, wrong schema version): a
store's failures are its database's (:class:`tracker.database.DatabaseError`)."""


class RejectedPings(StoreError):
    """The store refuses these pings for what they are, not for its state: appending
    them again would fail again (see :meth:`HistoryStore.reject`)."""


class Track(NamedTuple):
    """One vehicle's stored positions as columns, in time order."""

    vehicle_id: str
    ts: npt.NDArray[np.float64]
    lat: npt.NDArray[np.float64]
    lon: npt.NDArray[np.float64]
    speed: npt.NDArray[np.float64]
    heading: npt.NDArray[np.float64]

    def __len__(self) -> int:
        """The number of positions (not of fields)."""
        return len(self.ts)


class AreaPage(NamedTuple):
    """One page of an area query: tracks ordered by vehicle id, each in time order.

    ``cursor`` is None on the last page; otherwise pass it back as ``after`` to continue
    exactly after the last position returned (a vehicle's track may span pages).
    """

    tracks: list[Track]
    cursor: tuple[str, float] | None


class StoreStats(NamedTuple):
    """What ``/metrics`` and the benchmark report about a store."""

    positions: int
    bytes_on_disk: int


class HistoryStore(Protocol):
    """Where accepted pings are kept; see the module docstring for threads and units."""

    resolution: int
    """H3 resolution of the cells a store indexes chunks by (fixed when it was created)."""

    decoded: DecodedChunks
    """Chunks decoded for queries, kept by content (``tracker.history.decoded``): none
    unless given a budget (history reader processes do)."""

    def migrate(self) -> None:
        """Create or upgrade the schema to this version; refuses a newer one."""

    def append(self, pings: Sequence[Ping]) -> None:
        """Keep ``pings`` durably in one commit (returns once committed)."""

    def reject(self, pings: Sequence[Ping], reason: str) -> None:
        """Keep pings that :meth:`append` refused (:class:`RejectedPings`) aside, as they
        came, with the reason: they are not history, but not lost either."""

    def compact(self, before: float, *, steps: int | None = None) -> int:
        """Append what was appended before ``before`` to track chunks as segments, in
        steps of one short transaction each; positions moved (0: nothing was left).

        With ``steps``, at most that many steps; without, until nothing is left, and then
        every chunk whose bucket is entirely before ``before`` is sealed too
        (:meth:`seal`). ``inf`` compacts everything.
        """

    def seal(self, before: float, *, limit: int) -> int:
        """Merge the segments of at most ``limit`` chunks whose bucket is entirely before
        ``before`` into one each, in one transaction; chunks sealed (0: none was left)."""

    def expire(self, before: float, *, limit: int) -> int:
        """Delete at most ``limit`` chunks or batches entirely older than ``before``
        (a chunk once its whole bucket is; ``inf``: everything).

        Small steps, each its own short transaction: the caller repeats until it returns 0,
        so retention never holds a long lock.
        """

    def track(
        self, vehicle_id: str, start: float, end: float, *, limit: int, after: float | None = None
    ) -> Track:
        """At most ``limit`` positions of one vehicle with ``start <= ts < end``.

        With ``after``, only those with ``ts > after`` (the continuation of a page).
        """

    def area(
        self,
        cells: Collection[int],
        start: float,
        end: float,
        *,
        limit: int,
        after: tuple[str, float] | None = None,
    ) -> AreaPage:
        """Positions with ``start <= ts < end`` whose cell (at :attr:`resolution`) is in
        ``cells``, at most ``limit`` of them, grouped by vehicle."""

    def stats(self) -> StoreStats:
        """Positions kept and bytes on disk."""

    def close(self) -> None:
        """Close every connection this store opened."""


def open_store(target: str, resolution: int = 7) -> HistoryStore:
    """The store ``target`` names (``TrackerConfig.history_target``), not yet migrated.

    ``postgresql://...`` (or ``postgres://``) is a :class:`~tracker.history.postgres.PostgresStore`;
    ``sqlite:PATH`` or a bare file path a :class:`~tracker.history.sqlite.SqliteStore`.
    Each is imported only when named, so an instance without PostgreSQL never loads its
    driver. Nothing is opened yet (stores connect lazily, in the thread that uses them).
    Raises ValueError for an empty target or another scheme, naming what is accepted.
    """
    stripped = target.strip()
    if stripped.lower().startswith(POSTGRES_SCHEMES):
        from tracker.history.postgres import PostgresStore

        return PostgresStore(stripped, resolution)
    path = stripped.removeprefix("sqlite:")
    if "://" in stripped or not path.strip():
        raise ValueError(
            f"history target {without_password(target)!r} is neither postgresql://... "
            "nor sqlite:PATH nor a file path"
        )
    from tracker.history.sqlite import SqliteStore

    return SqliteStore(path, resolution)
