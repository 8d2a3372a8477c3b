"""The zone book: the zones a tracker holds, kept durably, and the engine they feed.

:class:`ZoneBook` is what the tracker (``Tracker.zones``) and the API
(``tracker.zones.routes``) talk to. A change is written to the store first, then held here
(what ``GET /zones`` reads, on the loop) and queued for the engine, one change at a
time (a lock), so what the engine holds is what a restart reloads. Compiling a zone's
cover and every database call run in worker threads; the engine runs in its own
(:class:`~tracker.zones.worker.ZoneWorker`), which takes the change before the next
tick's pings.

At start (:meth:`ZoneBook.open`, from ``Tracker.run``) every stored zone is read back
and compiled (about a millisecond each, in a worker thread), before the tracker reports
started. Then :meth:`ZoneBook.follow` (a task of ``Tracker.run``) looks every
:data:`REFRESH_S` for zones written or deleted by other instances sharing the database
(each row's ``updated_at``), and takes them in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Final

import h3.api.basic_int as h3i
import trio

from tracker.database import DatabaseError
from tracker.errors import TrackerError
from tracker.zones.cover import CompiledZone, compile_zone
from tracker.zones.model import Zone, parse_zone
from tracker.zones.store import ZoneStore
from tracker.zones.worker import ZoneWorker

__all__ = ["MAX_ZONES", "REFRESH_S", "Area", "TooManyZones", "ZoneBook", "ZoneExists"]

logger = logging.getLogger(__name__)

REFRESH_S: Final = 10.0
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
        self._held: dict[str, CompiledZone] = {}
        """The zones held (the engine's, as of the changes queued for it): on the loop."""
        self._versions: dict[str, float] = {}
        """When each zone held was last written to the database (``updated_at``)."""

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
        """Read every stored zone back into the engine."""
        if self.store is None or not self.store.present:
            return
        async with self._lock:
            count = await self._take_in(await trio.to_thread.run_sync(self.store.versions))
        if count:
            logger.info("%d zones loaded from %s", count, self.store.where)

    async def follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Take in, every :data:`REFRESH_S`, what other instances changed; runs until
        cancelled. A database that does not answer is logged and asked again later."""
        task_status.started()
        if self.store is None:
            return
        while True:
            await trio.sleep(REFRESH_S)
            await self.refresh()

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

    async def _take_in(self, versions: dict[str, float]) -> int:
        """Hold the stored zones whose version differs from ours, drop those gone."""
        assert self.store is not None
        now = time.time()
        changed = [i for i, when in versions.items() if self._versions.get(i) != when]
        gone = [i for i in self._versions if i not in versions]
        for zone_id in gone:
            self._drop(zone_id, now)
            del self._versions[zone_id]
        if not changed:
            return len(gone)
        rows = await trio.to_thread.run_sync(self.store.features, changed)
        zones: list[tuple[Zone, float]] = []
        for feature, when in rows:
            try:
                zones.append((parse_zone(feature), when))
            except TrackerError as error:  # written by a newer tracker, or by hand
                logger.warning("stored zone %r skipped: %s", feature.get("id"), error.message)
        compiled = await trio.to_thread.run_sync(self._compile_all, [z for z, _ in zones])
        for one, (_, when) in zip(compiled, zones, strict=True):
            self._hold(one, now)
            self._versions[one.zone.id] = when
        return len(gone) + len(compiled)

    def _compile_all(self, zones: list[Zone]) -> list[CompiledZone]:
        return [compile_zone(zone, self.resolution) for zone in zones]

    async def put(self, zones: list[Zone], *, replace: bool) -> list[bool]:
        """Store and hold ``zones`` (all or none); for each, whether it is new.

        Without ``replace``, an id already held is refused (409) before anything is
        written.
        """
        compiled = await trio.to_thread.run_sync(self._compile_all, zones)
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
