"""The zone book: the zones a tracker holds, kept durably, and the engine they feed.

:class:`ZoneBook` is what the tracker (``Tracker.zones``) and the API
(``tracker.zones.routes``) talk to. A change is written to the store first, then held here
(what ``GET /zones`` reads, on the loop) and queued for the engine, one change at a
time (a lock), so what the engine holds is what a restart reloads. Compiling a zone's
cover and every database call run in worker threads; the engine runs in its own
(:class:`~tracker.zones.worker.ZoneWorker`), which takes the change before the next
tick's pings.

At start (:meth:`ZoneBook.open`, from ``Tracker.run``) the stored zones are read back
and the first :data:`LOAD_CHUNK` compiled (about 1.5 ms each, parsing included, in a
worker thread) before the tracker reports started; :meth:`ZoneBook.follow` (a task of
``Tracker.run``) holds the rest a chunk at a time while the tracker serves (``/healthz``
warns until all are held; zone changes wait for it), then looks every
:data:`REFRESH_S` for zones written or deleted by other instances sharing the database
(each row's ``updated_at``), and takes them in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Final

import h3.api.basic_int as h3i
import trio

from tracker.database import DatabaseError
from tracker.errors import TrackerError
from tracker.zones.cover import CompiledZone, compile_zone
from tracker.zones.model import Zone, parse_zone
from tracker.zones.store import ZoneStore
from tracker.zones.worker import ZoneWorker

__all__ = ["LOAD_CHUNK", "MAX_ZONES", "REFRESH_S", "Area", "TooManyZones", "ZoneBook", "ZoneExists"]

logger = logging.getLogger(__name__)

REFRESH_S: Final = 10.0
LOAD_CHUNK: Final = 500
"""Stored zones read and compiled at a time (about 0.7 s of a worker thread)."""
"""How often the database is asked for zones changed by other instances."""
MAX_ZONES: Final = 100_000
"""Zones one tracker holds at most (the benchmark measures 10,000)."""


class TooManyZones(TrackerError):
    """The tracker holds :data:`MAX_ZONES` already."""

    status = 409
    code = "too_many_zones"


class ZoneBook:
    """The zones, their store and their engine (run by ``worker``)."""

    def __init__(self, worker: ZoneWorker, store: ZoneStore | None, *, resolution: int) -> None:
        self.worker = worker
        self.store = store
        self.resolution = resolution
        self._lock = trio.Lock()
        self.limiter = trio.CapacityLimiter(1)
        """Zone work in worker threads (compiling, decoding large bodies): one at a time,
        as each thread that holds the GIL delays the event loop too."""
        self._held: dict[str, CompiledZone] = {}
        """The zones held (the engine's, as of the changes queued for it): on the loop."""
        self._versions: dict[str, float] = {}
        """When each zone held was last written to the database (``updated_at``)."""
        self._stored: dict[str, float] | None = None
        """The versions read at :meth:`open`, while :meth:`follow` has not held them all."""

    def __len__(self) -> int:
        return len(self._held)

    def get(self, zone_id: str) -> CompiledZone | None:
        return self._held.get(zone_id)

    def all(self) -> Iterable[CompiledZone]:
        """Every zone, in id order."""
        held = self._held
        for zone_id in sorted(held):
            compiled = held.get(zone_id)
            if compiled is not None:  # deleted while the caller was reading
                yield compiled

    def _hold(self, compiled: CompiledZone, now: float) -> None:
        zone_id = compiled.zone.id
        self.worker.put(compiled, now, new=zone_id not in self._held)
        self._held[zone_id] = compiled

    def _drop(self, zone_id: str, now: float) -> bool:
        if self._held.pop(zone_id, None) is None:
            return False
        self.worker.delete(zone_id, now)
        return True

    async def open(self) -> None:
        """Read the stored zones' versions back, and hold the first :data:`LOAD_CHUNK`
        of them now (a small set: all of it, before the tracker reports started); the
        rest is held by :meth:`follow`, in the background, a chunk at a time (10,000 zones
        take ~15 s to compile: the tracker serves meanwhile, changes wait their turn)."""
        if self.store is None or not self.store.present:
            return
        async with self._lock:
            self._stored = await trio.to_thread.run_sync(self.store.versions)
            await self._take_in(self._stored, chunks=1)

    async def follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the zones :meth:`open` left, then take in, every :data:`REFRESH_S`, what
        other instances changed; runs until cancelled. A database that does not answer
        is logged and asked again later."""
        task_status.started()
        if self.store is None:
            return
        if self._stored is not None:
            async with self._lock:
                await self._take_in(self._stored)
            logger.info("%d zones loaded from %s", len(self._held), self.store.where)
            self._stored = None
        while True:
            await trio.sleep(REFRESH_S)
            await self.refresh()

    def warning(self) -> str | None:
        """What ``/healthz`` should warn about: zones still loading, the engine behind."""
        if self._stored is not None and len(self._held) < len(self._stored):
            return f"zones loading from the database: {len(self._held)} of {len(self._stored)}"
        return self.worker.warning()

    def problem(self) -> str | None:
        """What ``/healthz`` should report as a problem (the engine dropped pings)."""
        return self.worker.problem()

    async def refresh(self) -> int:
        """Take in the zones changed or deleted in the database since last seen; how many."""
        assert self.store is not None
        if not self.store.present and not self._versions:
            return 0
        try:
            async with self._lock:
                return await self._take_in(await trio.to_thread.run_sync(self.store.versions))
        except DatabaseError as error:
            logger.warning("zones not refreshed from the database: %s", error)
            return 0

    async def _take_in(self, versions: dict[str, float], *, chunks: int | None = None) -> int:
        """Hold the stored zones whose version differs from ours (at most ``chunks`` of
        :data:`LOAD_CHUNK`), drop those gone; how many changed."""
        assert self.store is not None
        now = time.time()
        changed = [i for i, when in versions.items() if self._versions.get(i) != when]
        gone = [i for i in self._versions if i not in versions]
        for zone_id in gone:
            self._drop(zone_id, now)
            del self._versions[zone_id]
        if chunks is not None:
            changed = changed[: chunks * LOAD_CHUNK]
        held = 0
        for first in range(0, len(changed), LOAD_CHUNK):
            rows = await trio.to_thread.run_sync(
                self.store.features, changed[first : first + LOAD_CHUNK]
            )
            compiled = await trio.to_thread.run_sync(self._compile_rows, rows, limiter=self.limiter)
            for one, when in compiled:
                self._hold(one, now)
                self._versions[one.zone.id] = when
                held += 1
        return len(gone) + held

    def _compile_rows(
        self, rows: list[tuple[dict[str, Any], float]]
    ) -> list[tuple[CompiledZone, float]]:
        """Stored Features parsed and compiled (in a worker thread), with their versions."""
        compiled: list[tuple[CompiledZone, float]] = []
        for feature, when in rows:
            try:
                compiled.append((compile_zone(parse_zone(feature), self.resolution), when))
            except TrackerError as error:  # written by a newer tracker, or by hand
                logger.warning("stored zone %r skipped: %s", feature.get("id"), error.message)
        return compiled

    def _compile_all(self, zones: list[Zone]) -> list[CompiledZone]:
        return [compile_zone(zone, self.resolution) for zone in zones]

    async def put(self, zones: list[Zone], *, replace: bool) -> list[bool]:
        """Store and hold ``zones`` (all or none); for each, whether it is new.

        Without ``replace``, an id already held is refused (409) before anything is
        written.
        """
        compiled = await trio.to_thread.run_sync(self._compile_all, zones, limiter=self.limiter)
        async with self._lock:
            new = [zone.id not in self._held for zone in zones]
            if not replace and not all(new):
                taken = next(z.id for z, fresh in zip(zones, new, strict=True) if not fresh)
                raise ZoneExists(f"zone {taken!r} exists; PUT /zones/{{id}} replaces it", id=taken)
            if len(self._held) + sum(new) > MAX_ZONES:
                raise TooManyZones(f"a tracker holds at most {MAX_ZONES} zones")
            written = 0.0
            if self.store is not None:
                store = self.store
                written = await trio.to_thread.run_sync(store.put, [z.feature() for z in zones])
            now = time.time()
            for one in compiled:
                self._hold(one, now)
                self._versions[one.zone.id] = written
        return new

    async def delete(self, zone_id: str) -> bool:
        """Forget a zone (stored and held); False if there was none."""
        async with self._lock:
            if self.get(zone_id) is None:
                return False
            if self.store is not None:
                await trio.to_thread.run_sync(self.store.delete, zone_id)
            self._versions.pop(zone_id, None)
            return self._drop(zone_id, time.time())


class ZoneExists(TrackerError):
    """POST of a zone whose id is taken."""

    status = 409
    code = "zone_exists"


class Area:
    """A reader's area (cells of the index resolution; None: everywhere), ready to meet
    the zones' footprints: set intersections, and the area's ancestors at the few
    resolutions of large zones' compacted insides, worked out once a request."""

    def __init__(self, cells: frozenset[int] | None) -> None:
        self.cells = cells
        self._up: dict[int, frozenset[int]] = {}

    def sees(self, compiled: CompiledZone) -> bool:
        """Whether some cell of the zone's cover lies in the area."""
        if self.cells is None or not self.cells.isdisjoint(compiled.footprint):
            return True
        for cell in compiled.coarse:
            res = h3i.get_resolution(cell)
            up = self._up.get(res)
            if up is None:
                up = self._up[res] = frozenset(h3i.cell_to_parent(c, res) for c in self.cells)
            if cell in up:
                return True
        return False
