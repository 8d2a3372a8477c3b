"""The tracker's core and its API: ingest, feeds, health and shutdown, apart from HTTP.

:class:`Tracker` holds the geo-index, the feed hub, the bus and the metrics, and is the one
thing a front end talks to (``tracker.app`` maps HTTP onto it; a test or a benchmark can
drive it without any server):

* :meth:`Tracker.ingest` decodes a posted batch, and :meth:`Tracker.ingest_pings` checks
  and applies decoded pings (any protocol's) and hands them to the bus and to history
  (:attr:`Tracker.history`, when configured: it may refuse a batch with 503 first);
* :meth:`Tracker.open_feed` opens one feed: the bus watches its area, the hub subscribes
  it, and it yields the encoded SSE chunks; leaving the block undoes all three;
* :meth:`Tracker.locate` says where one vehicle was last published (a map's search);
* :meth:`Tracker.health` and :attr:`Tracker.ready` say whether it can do its job;
* :meth:`Tracker.shutdown` begins shutdown: every feed gets its final event.
* :attr:`Tracker.alerts` is the log of zone events (the zone engine's sink) and
  :attr:`Tracker.webhooks` their webhook deliveries (``tracker.alerts``); their tasks
  (commits, retention, one delivery task per subscription) run in ``tracker_nursery``.

Tasks: :meth:`Tracker.run` (started by ``tracker.server.serve`` into its
``service_nursery``) owns ``tracker_nursery``, which holds the bus's tasks, history's
(``tracker.history.writer``: commits, compaction, retention; it flushes on the way out),
the device sources (MQTT, GTFS-realtime feeds: ``tracker.devices.sources``), the zones'
refresh from the database (``tracker.zones.book``) and the ticker.
It runs until its owner cancels it. It never swallows a crash: an exception from the
ticker or a bus task is logged once and propagates, so the server goes down with it
(non-zero exit) instead of answering requests with a dead core.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import msgspec
import trio

from tracker.alerts.log import AlertLog
from tracker.alerts.store import AlertStore
from tracker.alerts.webhooks import Webhooks
from tracker.bus import Bus, LocalBus, RedisBus
from tracker.config import TrackerConfig
from tracker.devices.gateway import DeviceGateway
from tracker.devices.sources import run_sources
from tracker.feed import feed_events
from tracker.fleets import DEFAULT_KEY, KeyFleet
from tracker.following import Follower
from tracker.frames import encode_tick
from tracker.geoindex import GeoIndex, Publication
from tracker.history.readers import ReaderPool
from tracker.history.store import open_store
from tracker.history.writer import History
from tracker.hub import FeedHub, Resume, Subscription
from tracker.ingest import (
    INGEST_SLICE_PINGS,
    Target,
    admit_all,
    apply_pings,
    apply_pings_async,
    decode_body,
)
from tracker.meta import MetaStore, RedisMeta, VehicleMeta
from tracker.metrics import Metrics
from tracker.pings import IngestReply, Ping, Rejections
from tracker.revocation import RedisRevocations, Revocation, Revocations, expiry_of
from tracker.views import NOWHERE, View
from tracker.zones.book import ZoneBook
from tracker.zones.engine import ZoneEngine
from tracker.zones.events import EventSink
from tracker.zones.store import ZoneStore
from tracker.zones.worker import ZoneWorker

__all__ = ["CoreCrashed", "Health", "Lifecycle", "Tracker", "VehicleReport"]

logger = logging.getLogger(__name__)

STUCK_AFTER_TICKS = 5
"""The ticker counts as stuck once its last tick is this many ticks old..."""
STUCK_AFTER_MIN_S = 2.0
"""...and at least this many seconds old (short test ticks must not flap)."""
STARTUP_STUCK_S = 60.0
"""A start (stores opened, the zone engine's process started) that takes longer is stuck."""
TICK_SLICE_VEHICLES = 400
"""Vehicles a tick prepares between two turns of the event loop (under 1 ms of work): a
tick of 50,000 vehicles held the loop 120-390 ms in one step before, and slices of
1,000 (2-3 ms) still added up at a request's many checkpoints (a day track's p99 under
full ingest load: docs/performance.md)."""


class CoreCrashed(Exception):
    """A core task crashed; the cause is chained and was logged with its traceback.

    Raised out of :meth:`Tracker.run` so that the front end can exit non-zero without
    printing the same traceback a second time.
    """


class Lifecycle(enum.Enum):
    """Where the core is in its life; only ``RUNNING`` is ready for traffic."""

    STARTING = "starting"  # constructed; the ticker has not published a tick yet
    RUNNING = "running"  # ticking; ready
    STOPPING = "stopping"  # shutdown() was called: feeds are told to leave
    FAILED = "failed"  # a core task crashed; the process is going down


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """What ``/healthz`` reports: ``status`` is "ok" unless ``problems`` lists something.

    A degraded bus is not a problem of this instance (it keeps serving what it has), so
    it shows in ``bus`` and ``warnings`` but leaves ``status`` "ok". A failing history
    store neither (``history`` "failing", and a warning): feeds go on, ingest keeps the
    pings queued and answers 503 once the queue is full; restarting the instance would
    not mend the store and would lose the queued pings it acknowledged.
    """

    status: str
    problems: list[str]
    warnings: list[str]
    state: str
    last_tick_age_s: float | None
    tick: int
    bus: str
    history: str
    """``off``, ``ok``, or ``failing`` (the last commit failed; pings stay queued)."""
    vehicles: int
    subscribers: int

    @property
    def ok(self) -> bool:
        """Whether the instance can do its job (``/healthz`` answers 200)."""
        return not self.problems


class VehicleReport(msgspec.Struct, frozen=True, kw_only=True):
    """Where a vehicle was last published (``GET /vehicles/{id}``): what feeds showed."""

    id: str
    lat: float
    lon: float
    ts: float
    speed: float | None
    heading: float | None
    stale: bool
    cell: str
    """The H3 index cell, as hex (what ``cells=`` takes)."""


class _Intake:
    """One batch on its way in: its pings, its admission, and where accepted pings go.

    :meth:`admit` asks the caller's admission (a rate limit), the alerts log's and
    history's, in that order; history reserves room for the batch, released when the
    tracker hands the accepted pings on (``Tracker._hand_on``), whatever happened.
    """

    def __init__(
        self,
        *,
        pings: Sequence[Ping | None],
        rejections: Rejections,
        now: float,
        forwarded: list[Ping] | None,
        admits: list[Callable[[int], None]],
        history: History | None,
        tracker: Tracker,
    ) -> None:
        self.pings = pings
        self.rejections = rejections
        self.now = now
        self.forwarded = forwarded
        self.history = history
        self.reserved = 0
        self._admits = admits
        self._tracker = tracker

    @property
    def target(self) -> Target:
        """What :func:`tracker.ingest.applying` applies the batch to: made when asked for,
        not kept, as it holds :meth:`admit`, bound to this intake; the cycle would keep every
        batch's pings until a full collection, which the serving processes' thresholds
        make rare (``cli.GC_THRESHOLDS``: the tracker grew by 2 GB in two and a half
        minutes of 50,000 pings a second)."""
        tracker = self._tracker
        return Target(
            tracker.index, tracker.config, tracker.metrics, self.now, self.admit, self.forwarded
        )

    def admit(self, pings: int) -> None:
        for admit in self._admits:
            admit(pings)
        if self.history is not None:
            self.history.admit(pings)
            self.reserved = pings


class Tracker:
    """Everything one tracker process holds, and the ticker that moves it forward."""

    def __init__(
        self,
        config: TrackerConfig,
        *,
        bus: Bus | None = None,
        zone_sink: EventSink | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.devices = DeviceGateway(config, self.ingest_pings)
        self.metrics.sources = self.devices.stats
        self.revocations = Revocations(config.revocations_file, max_entries=config.revocations_max)
        """Revoked token ids (``tracker.revocation``): their feeds end, their requests 401."""
        self.meta = MetaStore(config.meta_file, max_entries=config.meta_max)
        """What each vehicle is (``tracker.meta``): read by clients once per session."""
        self.fleets = self.devices.fleets
        self.index = GeoIndex(
            resolution=config.h3_resolution,
            stale_after_s=config.stale_after_s,
            remove_after_s=config.remove_after_s,
            forget_after_ticks=config.replay_ticks,
            fleet_of=self.fleets.fleet_of,
        )
        self.hub = FeedHub(config, self.index, self.metrics)
        self.bus: Bus = bus or self._make_bus()
        self.revocations.listen(self.hub.end_token)
        self.shared_revocations = (
            RedisRevocations(config.bus, self.revocations, timeout_s=config.bus_timeout_s)
            if config.bus
            else None
        )
        """Revocations shared with the other instances (a Redis bus), else None."""
        self.shared_meta = (
            RedisMeta(config.bus, self.meta, timeout_s=config.bus_timeout_s) if config.bus else None
        )
        """Vehicle metadata shared with the other instances (a Redis bus), else None."""
        self.follower = (
            Follower(
                self.bus,
                self.index,
                followed=self.hub.followed,
                shard_resolution=config.bus_shard_resolution,
                next_tick=self.next_tick,
            )
            if config.bus
            else None
        )
        """Keeps a Redis bus watching the shards of followed vehicles, else None."""
        self.lifecycle = Lifecycle.STARTING
        self._applying = trio.Lock()  # held by the ingest batch being applied in slices
        self.stopping = trio.Event()
        """Set once :meth:`shutdown` began: feeds not held by the hub (replays) end on it."""
        self._ticked = trio.Event()
        self._last_tick_at: float | None = None  # trio clock of the last tick (or of its start)
        self._started_at: float | None = None  # trio clock of run(): how long starting takes
        self.metrics.gauges.update(
            vehicles=("Vehicles tracked, stale ones included.", lambda: self.index.vehicle_count),
            vehicles_stale=("Vehicles marked stale.", lambda: self.index.stale_count),
            subscribers=("Open feed subscriptions.", lambda: self.hub.subscriber_count),
            watched_cells=("Index cells with a subscriber.", lambda: self.hub.watched_cells),
            tick=("Number of the last published tick.", lambda: self.index.tick),
        )
        self.metrics.feeds = self.hub.subscriptions  # read at scrape time, no record each
        self.metrics.bus_state = lambda: self.bus.state
        self.alerts = AlertLog(
            config, self.metrics, functools.partial(AlertStore.open, config.database_target)
        )
        """The durable log of zone events: the zone engine's sink (``tracker.alerts``)."""
        self.webhooks = Webhooks(config, self.metrics, self.alerts)
        """Webhook subscriptions and their delivery tasks, reading :attr:`alerts`."""
        self.history = (
            History(
                config,
                self.metrics,
                functools.partial(open_store, config.history_target),
                readers=ReaderPool(config.history_target),
            )
            if config.history_target
            else None
        )
        """Where accepted pings are kept (None: history is off)."""
        self.zones = ZoneBook(
            ZoneWorker(
                ZoneEngine(remove_after_s=config.remove_after_s),
                zone_sink or self.alerts,
                self.metrics,
                name_of=self.index.name_of,
                process=not config.zone_engine_thread,
            ),
            ZoneStore(config.database_target),
            resolution=config.h3_resolution,
        )
        """Zones and their engine, run in a process of its own (``tracker.zones``): events go to
        ``zone_sink``, by default the alerts log (:attr:`alerts`)."""
        self.metrics.gauges.update(
            zones=("Zones held.", lambda: len(self.zones)), **self.zones.worker.gauges()
        )

    def _make_bus(self) -> Bus:
        if not self.config.bus:
            return LocalBus()
        return RedisBus(
            self.config.bus,
            index=self.index,
            metrics=self.metrics,
            config=self.config,
            resnapshot_all=self.hub.resnapshot_all,
            next_tick=self.next_tick,
        )

    # --- tasks ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the bus and publish a tick every ``tick_s`` until cancelled.

        Reports started once the bus runs and history's store is open (if it cannot be
        opened, its :class:`~tracker.history.store.StoreError` is raised as it is). A
        crash of any of its tasks marks the core failed (``/healthz`` 503), is logged,
        and is raised to the caller.
        """
        self._started_at = trio.current_time()
        if self.history is not None:
            await self.history.open()  # a store that cannot open is a startup error, not a crash
        await self.alerts.open()  # after history's: that names the database in errors
        await self.zones.open()
        self.revocations.load(time.time())
        self.meta.load()
        try:
            async with trio.open_nursery() as tracker_nursery:
                await tracker_nursery.start(self.alerts.run)
                await tracker_nursery.start(self.webhooks.run)
                await tracker_nursery.start(self.bus.run)
                if self.shared_revocations is not None:
                    await tracker_nursery.start(self.shared_revocations.shared.run)
                if self.shared_meta is not None:
                    await tracker_nursery.start(self.shared_meta.shared.run)
                if self.follower is not None:
                    await tracker_nursery.start(self.follower.run)
                if self.history is not None:
                    await tracker_nursery.start(self.history.run)
                await tracker_nursery.start(run_sources, self.devices)
                await tracker_nursery.start(self.zones.follow)
                await tracker_nursery.start(self.zones.worker.run)
                tracker_nursery.start_soon(self._beat_forever)
                task_status.started()
                self._last_tick_at = trio.current_time()  # a ticker that never ticks is stuck too
                await self._tick_forever()
        except BaseException as exc:
            if _is_cancellation(exc):
                raise
            self.lifecycle = Lifecycle.FAILED
            logger.critical("a core task crashed; the tracker stops", exc_info=exc)
            raise CoreCrashed(f"a core task crashed: {exc!r}") from exc

    async def _tick_forever(self) -> None:
        """One tick every ``tick_s``; a late tick is not made up twice.

        A tick that crashes marks the core failed at once: ``/healthz`` must not answer
        200 while the nursery cancels the other core tasks (which can take a few turns).
        """
        next_at = trio.current_time()
        while True:
            next_at += self.config.tick_s
            await trio.sleep_until(next_at)
            try:
                await self._tick_in_slices()
            except Exception:
                self.lifecycle = Lifecycle.FAILED
                raise
            next_at = max(next_at, trio.current_time() - self.config.tick_s)

    async def _beat_forever(self) -> None:
        """Heartbeat rounds for feeds written below the framework (``tracker.direct``)."""
        while True:
            await trio.sleep(self.config.heartbeat_s)
            self.hub.beat()

    async def _tick_in_slices(self) -> None:
        """:meth:`tick`, its costly part (each ping's cell and position) prepared first in
        slices of :data:`TICK_SLICE_VEHICLES`, between which other tasks run; the rest,
        publishing, is one step, so a snapshot never sees half a tick."""
        began = time.perf_counter()
        publication = self.index.take_pending()
        prepared_s = 0.0  # the slices' own time, not the other tasks' steps in between
        while publication.prepare(TICK_SLICE_VEHICLES):
            prepared_s += time.perf_counter() - began
            await trio.lowlevel.cancel_shielded_checkpoint()
            began = time.perf_counter()
        self.tick(publication, prepared_s=prepared_s + time.perf_counter() - began)

    def tick(self, publication: Publication | None = None, *, prepared_s: float = 0.0) -> None:
        """Publish everything ingested since the last tick to the feeds.

        ``publication``: the pings :meth:`GeoIndex.take_pending` took (prepared, in
        ``prepared_s``, counted in the tick's duration); None: everything pending now.
        """
        started = time.perf_counter() - prepared_s
        now = time.time()
        watched = self.hub.watched()  # before advance: a vehicle removed now is still known
        changes = self.index.advance(now, publication)
        frames = encode_tick(
            changes, watched, self.index.fleet_of_vid, only=self.hub.framed_cells()
        )
        self.metrics.view_frames += sum(len(view) for view in frames.views.values())
        self.hub.publish(frames)
        self.hub.end_expired(now)
        self.zones.worker.tick(now, changes)  # decided in the engine's thread
        self.metrics.observe_tick(time.perf_counter() - started)
        self.metrics.observe_published(now, changes.ping_ts)
        self._last_tick_at = trio.current_time()
        if self.lifecycle is Lifecycle.STARTING:
            self.lifecycle = Lifecycle.RUNNING
        self._ticked.set()
        self._ticked = trio.Event()

    async def next_tick(self) -> None:
        """Wait until the next tick has been published."""
        await self._ticked.wait()

    # --- the API -------------------------------------------------------------------------

    def ingest(
        self,
        body: bytes,
        content_type: str | None,
        *,
        admit: Callable[[int], None] = admit_all,
        now: float | None = None,
        fleet: KeyFleet = DEFAULT_KEY,
    ) -> IngestReply:
        """Decode one posted batch, then take it as :meth:`ingest_pings` does.

        Raises a :class:`~tracker.errors.TrackerError` when the body does not decode.
        """
        pings, rejections = decode_body(body, content_type, self.config)
        return self.ingest_pings(pings, rejections=rejections, admit=admit, now=now, fleet=fleet)

    async def ingest_async(
        self,
        body: bytes,
        content_type: str | None,
        *,
        admit: Callable[[int], None] = admit_all,
        now: float | None = None,
        fleet: KeyFleet = DEFAULT_KEY,
    ) -> IngestReply:
        """:meth:`ingest`, applying the batch in slices between which the event loop runs
        other tasks (``tracker.ingest.apply_pings_async``): what ``/ingest`` uses, so that
        a large batch does not hold every other request and the tick while it is applied.
        Admission, outcome and reply are :meth:`ingest`'s; once admitted, the batch is
        applied whole even if the caller is cancelled meanwhile.

        One batch is applied at a time (the others wait their turn, in order): the
        event loop then interleaves one slice of ingest with everything else, instead
        of one slice of every connection posting, so a request waits for a few ms of
        ingest per turn of the loop, not for connections x slices. A batch of one slice
        (``INGEST_SLICE_PINGS`` pings or fewer: a device's, a probe's) is applied at once
        instead, as one turn of a large batch would be: it does not wait in line behind
        the large batches of bulk senders (four 5,000-ping batches ahead of it are some
        forty turns of a busy loop: up to seconds, which was most of the ping-to-alert
        latency's tail under ingest load)."""
        pings, rejections = decode_body(body, content_type, self.config)
        if len(pings) <= INGEST_SLICE_PINGS:  # one slice: at once, not behind large batches
            return self.ingest_pings(
                pings, rejections=rejections, admit=admit, now=now, fleet=fleet
            )
        async with self._applying:  # before admission: a refused batch waited for nothing
            intake = self._intake(pings, rejections, admit, now, fleet)
            try:
                return await apply_pings_async(intake.pings, intake.rejections, intake.target)
            finally:
                self._hand_on(intake)

    def ingest_pings(
        self,
        pings: Sequence[Ping | None],
        *,
        rejections: Rejections | None = None,
        admit: Callable[[int], None] = admit_all,
        now: float | None = None,
        fleet: KeyFleet = DEFAULT_KEY,
    ) -> IngestReply:
        """Check and apply decoded pings of ``fleet``'s key, and forward what was taken.

        The one way in for pings, whoever decoded them (``/ingest``, the device
        protocols, GTFS-realtime feeds): the same checks, reasons and metrics for all.
        ``pings`` may hold None for one that did not decode (its reason in
        ``rejections``). ``admit(n)`` may refuse the batch by raising (a rate limit)
        before anything is applied, and so may history (503: its queue is full). Raises
        a :class:`~tracker.errors.TrackerError` when the batch is refused or nothing in
        it could be taken; accepted pings are in the index on return, and queued for
        history (committed within ``history_commit_s``).
        """
        rejections = Rejections() if rejections is None else rejections
        intake = self._intake(pings, rejections, admit, now, fleet)
        try:
            return apply_pings(intake.pings, intake.rejections, intake.target)
        finally:
            self._hand_on(intake)

    def _intake(
        self,
        pings: Sequence[Ping | None],
        rejections: Rejections,
        admit: Callable[[int], None],
        now: float | None,
        fleet: KeyFleet,
    ) -> _Intake:
        """A batch ready to be applied: placed in fleets, its admission and its sinks."""
        keep = self.bus.forwards or self.history or self.zones.worker.active
        return _Intake(
            pings=self._placed(pings, rejections, fleet),
            rejections=rejections,
            now=time.time() if now is None else now,
            forwarded=[] if keep else None,
            admits=[admit, self.alerts.admit],
            history=self.history,
            tracker=self,
        )

    def _hand_on(self, intake: _Intake) -> None:
        """What a batch left in the index goes on to the bus, history and zones."""
        forwarded = intake.forwarded
        if forwarded:
            self.bus.forward(forwarded)
            self.zones.worker.record(forwarded, intake.now)
        if intake.history is not None and intake.reserved:
            intake.history.record(forwarded or [], reserved=intake.reserved)

    def _placed(
        self, pings: Sequence[Ping | None], rejections: Rejections, fleet: KeyFleet
    ) -> Sequence[Ping | None]:
        """The pings named by their wire ids; one the key may not send becomes None, with
        its reason, and is counted (``tracker_pings_refused_fleet_total``)."""
        if self.fleets.single and fleet == DEFAULT_KEY and not any(p and p.fleet for p in pings):
            return pings  # one fleet, and nobody names one: every id is its own wire id
        placed: list[Ping | None] = []
        for position, ping in enumerate(pings):
            where = None if ping is None else self.fleets.place(ping, fleet)
            if isinstance(where, str):
                rejections.add(position, where)
                self.metrics.pings_refused_fleet += 1
                where = None
            placed.append(where)
        return placed

    async def join(
        self,
        view: View | frozenset[int],
        *,
        is_json: bool,
        last_event_id: str | None,
        expires: float | None = None,
        jti: str | None = None,
    ) -> tuple[Subscription, Resume]:
        """Subscribe one feed of a view (or of cells): its subscription and its first
        event; the caller must :meth:`leave` it once. The feed ends at shutdown, or when
        its token ``expires`` or its ``jti`` is revoked (the hub closes the subscription).

        The bus first makes sure the area's vehicles are here (Redis bus), then the hub
        subscribes the feed and decides its first event (replay of ``last_event_id`` or a
        snapshot) in the same synchronous step. What writes the feed is the caller's:
        :meth:`open_feed` (as a byte stream, for the ASGI app) or ``tracker.direct`` (to
        a socket). Not a context manager, so that a feed without a task (``tracker.direct``'s
        poller) holds no suspended frame for it.
        """
        if not isinstance(view, View):
            view = View(view)
        cells = view.cells or NOWHERE  # vehicles anywhere: the follower's shards
        try:
            await self.bus.watch(cells)
            async with self._following(view):
                sub = self.hub.subscribe(view, is_json=is_json, expires=expires, jti=jti)
        except BaseException:
            self.bus.unwatch(cells)
            raise
        try:
            first = self.hub.start(sub, last_event_id)
        except BaseException:
            self.leave(sub)
            raise
        self.metrics.feeds_opened += 1
        return sub, first

    def leave(self, sub: Subscription) -> None:
        """Unsubscribe and unwatch a feed that :meth:`join` opened (once)."""
        self.hub.unsubscribe(sub)
        self.bus.unwatch(sub.cells)

    @asynccontextmanager
    async def open_feed(
        self,
        view: View | frozenset[int],
        *,
        is_json: bool,
        last_event_id: str | None,
        expires: float | None = None,
        jti: str | None = None,
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open one feed (:meth:`join`); yields its SSE byte chunks, endless until
        shutdown, or until its token ``expires`` or its ``jti`` is revoked. After
        :meth:`shutdown` a feed still opens, and ends after its first event with the
        ``shutdown`` event. Leaving the block, however, unsubscribes and unwatches at once.
        """
        sub, first = await self.join(
            view, is_json=is_json, last_event_id=last_event_id, expires=expires, jti=jti
        )
        events = feed_events(
            self.hub,
            sub,
            first,
            retry_ms=self.config.retry_ms,
            heartbeat_s=self.config.heartbeat_s,
            metrics=self.metrics,
        )
        try:
            yield events
        finally:
            try:
                await events.aclose()
            finally:
                self.leave(sub)

    def _following(self, view: View) -> AbstractAsyncContextManager[None]:
        """While a vehicle feed opens, its vehicles' shards are watched (Redis bus)."""
        if self.follower is None or view.vehicles is None:
            return contextlib.nullcontext()
        return self.follower.opening(view.vehicles)

    async def revoke(self, jti: str) -> Revocation:
        """Revoke the token ``jti`` here and on every instance, until it expires: its feeds
        end with a ``revoked`` event and it is refused from now on. Idempotent. Raises
        ``RevocationUnavailable`` (503) when the other instances could not be told."""
        now = time.time()
        revocation = Revocation(jti, expiry_of(jti, now))
        self.revocations.apply(revocation, now)
        if self.shared_revocations is not None:
            await self.shared_revocations.publish(revocation)
        return revocation

    async def set_meta(self, vehicle_id: str, meta: VehicleMeta | None) -> None:
        """Set (None: delete) a vehicle's metadata here and on every instance. Raises 400 or
        503 as ``MetaStore.check`` does, and ``MetaUnavailable`` (503) when Redis did not
        answer in time (``tracker.meta``: retry)."""
        if self.shared_meta is None:
            self.meta.set(vehicle_id, meta)
        else:
            await self.shared_meta.set(vehicle_id, meta)

    def locate(self, vehicle_id: str) -> VehicleReport | None:
        """Where ``vehicle_id`` was last published, or None if this instance has not
        published it (unknown, removed, or only pending until the next tick).

        On a Redis bus an instance holds the vehicles of the areas its feeds watch; a
        vehicle elsewhere is found by the instance whose feeds cover it.
        """
        vehicle = self.index.vehicle(vehicle_id)
        if vehicle is None or vehicle.published is None:
            return None
        position = vehicle.published
        return VehicleReport(
            id=vehicle.vehicle_id,
            lat=position.lat,
            lon=position.lon,
            ts=position.ts,
            speed=_reported(position.speed),
            heading=_reported(position.heading),
            stale=vehicle.stale,
            cell=f"{vehicle.cell:x}",
        )

    def health(self) -> Health:
        """Whether this instance can do its job, and if not, what is wrong."""
        problems: list[str] = []
        warnings: list[str] = []
        age = None if self._last_tick_at is None else trio.current_time() - self._last_tick_at
        stuck_after = max(STUCK_AFTER_TICKS * self.config.tick_s, STUCK_AFTER_MIN_S)
        if self.lifecycle is Lifecycle.FAILED:
            problems.append("a core task crashed; the process is going down")
        elif age is not None and age > stuck_after:
            problems.append(f"the ticker is stuck: last tick {age:.1f} s ago")
        elif age is None and self._started_at is not None:
            # Opening stores and starting the zone engine's process comes before the first
            # tick; on a loaded machine it takes seconds, which is not a stuck ticker. Only
            # a start that never ends is a problem.
            starting = trio.current_time() - self._started_at
            if starting > STARTUP_STUCK_S:
                problems.append(f"the tracker is still starting after {starting:.0f} s")
        bus = self.bus.state
        if bus == "degraded":
            warnings.append("the bus is degraded: serving this instance's vehicles only")
        warnings.extend(self.devices.warnings())
        history = "off" if self.history is None else "failing" if self.history.failing else "ok"
        if self.history is not None and (trouble := self.history.warning()):
            warnings.append(trouble)
        if trouble := self.alerts.problem():
            problems.append(trouble)
        if trouble := self.zones.problem():
            problems.append(trouble)
        if trouble := self.zones.warning():
            warnings.append(trouble)
        if trouble := self.alerts.warning():
            warnings.append(trouble)
        return Health(
            status="ok" if not problems else "failing",
            problems=problems,
            warnings=warnings,
            state=self.lifecycle.value,
            last_tick_age_s=None if age is None else round(age, 3),
            tick=self.index.tick,
            bus=bus,
            history=history,
            vehicles=self.index.vehicle_count,
            subscribers=self.hub.subscriber_count,
        )

    @property
    def ready(self) -> bool:
        """Whether to send traffic here: running, and not shutting down (``/readyz``)."""
        return self.lifecycle is Lifecycle.RUNNING

    def shutdown(self) -> None:
        """Begin shutdown: not ready any more, and every feed ends with a final event.

        The one place feeds are closed. Idempotent. The tasks of :meth:`run` keep going
        (ingest and open requests finish normally) until the owner cancels them.
        """
        if self.lifecycle is not Lifecycle.FAILED:
            self.lifecycle = Lifecycle.STOPPING
        self.stopping.set()
        self.hub.close_all()
        self.alerts.close_streams()


def _reported(value: float | None) -> float | None:
    """A speed or heading as JSON carries it: None (not NaN) when not reported."""
    return None if value is None or math.isnan(value) else value


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is only cancellation (the owner stopping us), not a crash."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)
