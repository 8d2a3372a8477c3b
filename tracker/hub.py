"""The feed hub: who watches which cell, each watcher's bounded outbox, and the replay log.

Each tick the ticker hands the hub one encoded frame per changed cell. The hub base64s
each frame once, as its finished SSE ``data:`` line, keeps it in a bounded replay log, and
appends a reference to it to the outbox of every subscription covering the cell. Nothing
here awaits the network: ``publish`` never blocks, so a slow client can only hurt itself.
A subscription whose outbox overflows is conflated: its queue is dropped and it is owed
a fresh snapshot. A subscription with a :class:`Writer` (``tracker.direct``) is handed
its batch at once, inside ``publish``: the writer sends it without blocking or says it
could not, and only then is the feed's task (or, for a feed without one, the writer)
woken.

Synchronous except :meth:`Subscription.wait`; owns no tasks.
"""

from __future__ import annotations

import base64
import heapq
import secrets
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import trio

from tracker.compact import Step
from tracker.config import TrackerConfig
from tracker.frames import TickFrames, encode_snapshot
from tracker.geoindex import CellState, GeoIndex
from tracker.metrics import Metrics
from tracker.views import NOWHERE, View, ViewKey, Watched
from tracker.wire import decode_frame, frame_to_json

__all__ = [
    "Batch",
    "FeedHub",
    "Frame",
    "HubStatistics",
    "Resume",
    "Subscription",
    "SubscriptionStatistics",
    "Writer",
    "area_tag",
]


class Frame:
    """One cell's frame of one tick: base64'd once, rendered to JSON at most once.

    ``line`` is the frame's whole SSE line, ``data: <base64>\n``, built once and shared by
    every binary feed that sends it (an event is its header, these lines, a blank line).
    ``long`` is the frame with its moves spelled out as full records (see
    ``TickFrames.long``), kept because JSON is rendered from it, lazily. ``step``: a
    vehicle's frame also says what changed for the vehicle, for compact events
    (``tracker.compact``).
    """

    __slots__ = ("_json", "cell", "line", "long", "size", "step")

    def __init__(
        self, cell: int, msgpack: bytes, long: bytes | None = None, step: Step | None = None
    ) -> None:
        self.cell = cell
        self.step = step
        self.line = b"data: " + base64.b64encode(msgpack) + b"\n"
        self.size = len(self.line) - 7
        """Bytes of base64 (what outbox bounds and replay sizes count)."""
        self.long = long
        self._json: bytes | None = None

    @property
    def b64(self) -> bytes:
        """The frame in base64 (a copy: the line is what is kept)."""
        return self.line[6:-1]

    def json(self, name_of: Callable[[int], str | None]) -> bytes:
        """The frame as JSON, rendered on first use and then shared."""
        if self._json is None:
            msgpack = self.long or base64.b64decode(self.b64)
            self._json = frame_to_json(decode_frame(msgpack), name_of)
        return self._json

    @property
    def held_bytes(self) -> int:
        """What keeping this frame costs (the replay log's budget counts it)."""
        return len(self.line) + len(self.long or b"")


class Batch(NamedTuple):
    """The frames of one tick that one subscription must receive."""

    tick: int
    frames: list[Frame]


class Resume(NamedTuple):
    """How a feed starts: batches to replay, or (``snapshot``) a fresh snapshot."""

    snapshot: list[Frame] | None
    batches: list[Batch]


class Writer(Protocol):
    """What sends a subscription's owed events without a task switch (``tracker.direct``)."""

    def write_now(self) -> bool:
        """Send what the subscription owes now, without blocking; False if its task must
        finish the job (the socket is full, or it cannot be written synchronously)."""

    def beat(self) -> None:
        """A heartbeat round (:meth:`FeedHub.beat`): send a heartbeat if nothing was sent
        since the last round."""

    def wake(self) -> None:
        """Something is owed that :meth:`write_now` did not send (a snapshot, the final
        event, the end of a partial write) and no task waits in :meth:`Subscription.wait`:
        the writer sees to it later, never inside this call (the hub may be iterating)."""


@dataclass(frozen=True)
class SubscriptionStatistics:
    """A subscription's state at one moment (like trio's ``MemoryChannel.statistics()``).

    ``queued_batches``/``queued_bytes`` are what waits in the outbox, bounded by
    ``max_batches``/``max_bytes``; beyond, the subscription is conflated: the outbox is
    dropped (``conflations`` counts how often) and it ``owes_snapshot`` instead.
    """

    cells: int
    is_json: bool
    queued_batches: int
    queued_bytes: int
    max_batches: int
    max_bytes: int
    owes_snapshot: bool
    conflations: int
    closed: bool


@dataclass(frozen=True)
class HubStatistics:
    """The hub's state at one moment: subscriptions, watched cells, outboxes, replay log."""

    subscribers: int
    watched_cells: int
    owing_snapshot: int
    queued_batches: int  # over every outbox
    queued_bytes: int
    deepest_outbox_batches: int
    replay_ticks: int
    replay_bytes: int
    closed: bool


class Subscription:
    """One feed connection's interest (a :class:`~tracker.views.View`) and its bounded outbox.

    ``writer`` (None by default) is offered every batch as it is queued
    (:class:`Writer`); the feed's task is woken only when the writer declines. Slotted,
    with a plain list for an outbox and no event object: thousands are held at once.
    """

    __slots__ = (
        "_conflations",
        "_hub",
        "_outbox",
        "_outbox_bytes",
        "_waiter",
        "cells",
        "closed",
        "ending",
        "is_json",
        "jti",
        "owes_snapshot",
        "tag",
        "view",
        "writer",
    )

    def __init__(self, view: View, *, is_json: bool, tag: str, hub: FeedHub) -> None:
        self.view = view
        self.cells = view.cells or NOWHERE
        self.jti: str | None = None  # the token's id, if it has one (revocation ends us)
        self.ending = "shutdown"  # why the hub closed us: shutdown, expired, revoked
        self.is_json = is_json
        self.tag = tag  # identifies the area and format inside event ids
        self.closed = False
        self.owes_snapshot = False
        self.writer: Writer | None = None
        self._hub = hub
        self._outbox: list[Batch] = []
        self._outbox_bytes = 0
        self._conflations = 0
        self._waiter: trio.lowlevel.Task | None = None  # the task in wait(), if any

    def push(self, batch: Batch) -> None:
        """Queue a batch; on overflow drop the queue and owe a snapshot instead (conflation)."""
        if self.owes_snapshot:
            return
        size = 0
        for frame in batch.frames:
            size += frame.size
        config = self._hub.config
        if (
            len(self._outbox) >= config.outbox_max_ticks
            or self._outbox_bytes + size > config.outbox_max_bytes
        ):
            self._hub.metrics.conflations += 1
            self._conflations += 1
            self.owe_snapshot()
            return
        self._outbox.append(batch)
        self._outbox_bytes += size
        if self.writer is None or not self.writer.write_now():
            self._wake()

    def owe_snapshot(self) -> None:
        """Drop the queue and send a snapshot next (conflation, or the state jumped).

        While a snapshot is owed the outbox stays empty (``push`` queues nothing).
        """
        self.owes_snapshot = True
        self._outbox = []
        self._outbox_bytes = 0
        self._wake()

    def close(self, ending: str = "shutdown") -> None:
        """Ask the connection to finish: server shutdown, or its token expired or was
        revoked (``ending``, which picks the final event; the first reason stays)."""
        if not self.closed:
            self.ending = ending
        self.closed = True
        self._wake()

    @property
    def pending(self) -> bool:
        """Something is owed: batches, a snapshot, or the final event."""
        return bool(self._outbox) or self.owes_snapshot or self.closed

    async def wait(self) -> None:
        """Sleep until something is queued, a snapshot is owed, or the hub closes us.

        Parks the task itself rather than keeping an event per subscription: an idle feed
        holds nothing here but the reference to its task.
        """
        if self._outbox or self.owes_snapshot or self.closed:
            return
        self._waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_wait)

    def _abort_wait(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        """Wake the task waiting in :meth:`wait` (a writer that needs its task)."""
        self._wake()

    def _wake(self) -> None:
        task, self._waiter = self._waiter, None
        if task is not None:
            trio.lowlevel.reschedule(task)
        elif self.writer is not None:
            self.writer.wake()

    def take(self) -> Resume:
        """Everything owed now: queued batches, or a snapshot replacing them."""
        if self.owes_snapshot:
            self.owes_snapshot = False
            return Resume(self._hub.snapshot(self.view), [])
        batches = self._outbox
        self._outbox = []
        self._outbox_bytes = 0
        return Resume(None, batches)

    @property
    def queued_batches(self) -> int:
        """Batches waiting in the outbox (bounded by ``outbox_max_ticks``)."""
        return len(self._outbox)

    @property
    def queued_bytes(self) -> int:
        """Base64 bytes waiting in the outbox (bounded by ``outbox_max_bytes``)."""
        return self._outbox_bytes

    def statistics(self) -> SubscriptionStatistics:
        """A frozen record of this subscription's state now (for tests and /metrics)."""
        config = self._hub.config
        return SubscriptionStatistics(
            cells=len(self.cells),
            is_json=self.is_json,
            queued_batches=len(self._outbox),
            queued_bytes=self._outbox_bytes,
            max_batches=config.outbox_max_ticks,
            max_bytes=config.outbox_max_bytes,
            owes_snapshot=self.owes_snapshot,
            conflations=self._conflations,
            closed=self.closed,
        )


class FeedHub:
    """Fan-out of tick frames to subscriptions, with snapshots and resume.

    Event ids are ``<epoch>.<tick>.<tag>``: ``epoch`` is random per process start, so an
    id from before a restart is recognised as foreign; ``tag`` hashes the area and format,
    so an id reused for a different area gets a snapshot rather than a partial replay.

    A tick frames only the cells some feed may want (:meth:`framed_cells`): those watched
    now, and those watched within the last ``replay_ticks`` ticks, whose frames a feed
    resuming with ``Last-Event-ID`` may still be replayed. A fleet spread over a region
    changes thousands of cells a tick, mostly watched by nobody, and a frame costs tens of
    microseconds to encode and log: framing them all held the event loop at 50,000
    vehicles over 220 km (docs/performance.md).
    """

    def __init__(self, config: TrackerConfig, index: GeoIndex, metrics: Metrics) -> None:
        self.config = config
        self.index = index
        self.metrics = metrics
        self.epoch = secrets.token_hex(4)
        self.epoch_bytes = self.epoch.encode()
        self._by_cell: dict[int, set[Subscription]] = {}
        self._by_key: dict[ViewKey, set[Subscription]] = {}  # narrowed views (tracker.views)
        self._watched_since: dict[ViewKey, int] = {}  # a key's frames are logged after it
        self._framed_since: dict[int, int] = {}  # a cell's frames are made and logged after it
        self._unwatched: deque[tuple[int, int]] = deque()  # (framed until tick, cell)
        self._framed_until: dict[int, int] = {}  # cells in _unwatched: their latest until
        self._json_narrowed = 0  # narrowed JSON feeds: their keys' frames need a long form
        self._subscriptions: set[Subscription] = set()
        self._replay: deque[_Logged] = deque()
        self._replay_bytes = 0
        self._snapshot_cache: dict[int, Frame | None] = {}
        self._view_snapshots: dict[ViewKey, list[Frame]] = {}
        self._endings: list[tuple[float, int, Subscription]] = []  # heap: when tokens expire
        self._by_jti: dict[str, set[Subscription]] = {}
        self._closed = False

    # --- subscriptions -------------------------------------------------------------------

    def subscribe(
        self,
        view: View | frozenset[int],
        *,
        is_json: bool,
        expires: float | None = None,
        jti: str | None = None,
    ) -> Subscription:
        """Register interest in a view (or an area's cells); every later tick touching it
        is queued. A feed read with a token is ended when the token ``expires`` (checked
        every tick: :meth:`end_expired`) or its ``jti`` is revoked (:meth:`end_token`)."""
        if not isinstance(view, View):
            view = View(view)
        sub = Subscription(view, is_json=is_json, tag=view.tag(is_json), hub=self)
        if self._closed:
            sub.close()  # shutdown began: it gets its first event, then the final one
        if expires is not None:
            heapq.heappush(self._endings, (expires, id(sub), sub))
            self._compact_endings()
        if jti is not None:
            sub.jti = jti
            self._by_jti.setdefault(jti, set()).add(sub)
        if view.plain:
            for cell in sub.cells:
                self._by_cell.setdefault(cell, set()).add(sub)
                self._framed_since.setdefault(cell, self.index.tick)  # framed from next tick
        if is_json and not view.plain:
            self._json_narrowed += 1
        for key in view.watch_keys():
            if key not in self._by_key:
                self._watched_since[key] = self.index.tick  # its frames begin next tick
            self._by_key.setdefault(key, set()).add(sub)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a subscription at once (idempotent)."""
        if sub not in self._subscriptions:
            return
        self._subscriptions.discard(sub)
        if sub.jti is not None:
            _forget(self._by_jti, (sub.jti,), sub)
        if sub.view.plain:
            _forget(self._by_cell, sub.cells, sub)
            self._keep_framing(sub.cells)
        keys = sub.view.watch_keys()
        if sub.is_json and not sub.view.plain:
            self._json_narrowed -= 1
        _forget(self._by_key, keys, sub)
        for key in keys - self._by_key.keys():
            del self._watched_since[key]

    def _keep_framing(self, cells: Iterable[int]) -> None:
        """Frame the ``cells`` nobody watches any more for ``replay_ticks`` ticks yet: a
        feed that left may come back with ``Last-Event-ID`` within that time. One entry
        per cell in the queue (a later leave moves its end), so it is bounded by cells."""
        until = self.index.tick + self.config.replay_ticks
        for cell in cells:
            if cell in self._by_cell:
                continue
            if cell not in self._framed_until:
                self._unwatched.append((until, cell))
            self._framed_until[cell] = until

    def _stop_framing(self, tick: int) -> None:
        """Stop framing the cells nobody watched for ``replay_ticks`` ticks, as of ``tick``."""
        while self._unwatched and self._unwatched[0][0] <= tick:
            _, cell = self._unwatched.popleft()
            until = self._framed_until.pop(cell)
            if cell in self._by_cell:
                continue  # watched again
            if until > tick:  # left again later: keep it queued until then
                self._unwatched.append((until, cell))
                self._framed_until[cell] = until
            else:
                del self._framed_since[cell]

    def framed_cells(self) -> Collection[int]:
        """The cells whose frames the next tick must make (the class doc says which)."""
        return self._framed_since.keys()

    def end_expired(self, now: float) -> None:
        """End every feed whose token expired by ``now`` (``expired`` event, then close)."""
        while self._endings and self._endings[0][0] <= now:
            sub = heapq.heappop(self._endings)[2]
            if sub in self._subscriptions:
                sub.close("expired")

    def end_token(self, jti: str) -> int:
        """End every feed read with the token ``jti`` (revoked); returns how many."""
        subs = list(self._by_jti.get(jti, ()))
        for sub in subs:
            sub.close("revoked")
        return len(subs)

    def _compact_endings(self) -> None:
        """Drop the expiry entries of feeds gone (kept lazily; bounded to twice the live)."""
        if len(self._endings) > 2 * len(self._subscriptions) + 64:
            self._endings = [e for e in self._endings if e[2] in self._subscriptions]
            heapq.heapify(self._endings)

    def beat(self) -> None:
        """A heartbeat round for the subscriptions with a writer (their tasks keep no timer:
        ``Tracker.run`` calls this every ``heartbeat_s``)."""
        for sub in self._subscriptions:
            if sub.writer is not None:
                sub.writer.beat()

    def resnapshot_all(self) -> None:
        """Give every feed a fresh snapshot (the bus reconnected: batches may be missing)."""
        for sub in self._subscriptions:
            sub.owe_snapshot()

    def close_all(self) -> None:
        """Tell every subscription, and any opened later, to finish (server shutdown)."""
        self._closed = True
        for sub in self._subscriptions:
            sub.close()

    def subscriptions(self) -> list[Subscription]:
        """The open subscriptions (read their :meth:`Subscription.statistics`)."""
        return list(self._subscriptions)

    def statistics(self) -> HubStatistics:
        """A frozen record of the hub's state now (for tests, health and /metrics)."""
        subs = [sub.statistics() for sub in self._subscriptions]
        return HubStatistics(
            subscribers=len(subs),
            watched_cells=len(self._by_cell),
            owing_snapshot=sum(s.owes_snapshot for s in subs),
            queued_batches=sum(s.queued_batches for s in subs),
            queued_bytes=sum(s.queued_bytes for s in subs),
            deepest_outbox_batches=max((s.queued_batches for s in subs), default=0),
            replay_ticks=len(self._replay),
            replay_bytes=self._replay_bytes,
            closed=self._closed,
        )

    @property
    def subscriber_count(self) -> int:
        """Open subscriptions."""
        return len(self._subscriptions)

    @property
    def watched_cells(self) -> int:
        """Cells with at least one subscription."""
        return len(self._by_cell)

    # --- ticks ---------------------------------------------------------------------------

    def followed(self) -> list[str]:
        """The vehicles (wire ids) some feed follows."""
        return [key for key in self._by_key if isinstance(key, str)]

    def watched(self) -> Watched:
        """The narrowed views some feed watches: what the next tick must encode for them."""
        if not self._by_key:
            return Watched()
        json_keys = frozenset(
            key
            for key, subs in self._by_key.items()
            if self._json_narrowed and any(sub.is_json for sub in subs)
        )
        return Watched.of(self._by_key, self.index, json_keys)

    def publish(self, tick: TickFrames) -> None:
        """Encode a tick's frames once and queue them for their subscribers; never blocks."""
        frames = {
            cell: Frame(cell, data, tick.long.get(cell)) for cell, data in tick.frames.items()
        }
        views = {
            key: [Frame(f.cell, f.data, f.long, f.step) for f in view_frames]
            for key, view_frames in tick.views.items()
        }
        self._snapshot_cache.clear()
        self._view_snapshots.clear()
        # A vehicle's frames are not logged: its snapshot is one frame, never larger than
        # a replay, so a vehicle feed resumes with a snapshot (the rule of every feed), and
        # a log of them would cost every link replay_ticks frames of memory.
        fleet_views: dict[ViewKey, list[Frame]] = {
            key: f for key, f in views.items() if isinstance(key, tuple)
        }
        self._remember(_Logged.of(tick.tick, frames, fleet_views))
        self._stop_framing(tick.tick)
        owed: dict[Subscription, list[Frame]] = {}
        for cell, frame in frames.items():
            for sub in self._by_cell.get(cell, ()):
                owed.setdefault(sub, []).append(frame)
        for key, key_frames in views.items():
            for sub in self._by_key.get(key, ()):
                admitted = [f for f in key_frames if sub.view.admits(f.cell)]
                if admitted:
                    owed.setdefault(sub, []).extend(admitted)
        for sub, sub_frames in owed.items():
            sub.push(Batch(tick.tick, sub_frames))

    def _remember(self, logged: _Logged) -> None:
        self._replay.append(logged)
        self._replay_bytes += logged.size
        while self._replay and (
            len(self._replay) > self.config.replay_ticks
            or self._replay_bytes > self.config.replay_max_bytes
        ):
            self._replay_bytes -= self._replay.popleft().size

    # --- starting a feed -----------------------------------------------------------------

    def event_id(self, tick: int, sub: Subscription) -> str:
        """The id of the event that leaves ``sub`` up to date at ``tick``."""
        return f"{self.epoch}.{tick}.{sub.tag}"

    def start(self, sub: Subscription, last_event_id: str | None) -> Resume:
        """How a new connection begins: the batches it missed, else a snapshot.

        Replays only when the id is ours (same epoch and area), still covered by the
        replay log, and the replay is smaller than a snapshot. Anything else, including
        garbage, gets a snapshot: never an error, never a stuck or flooded stream.
        """
        since = self._resumable_tick(sub, last_event_id)
        if since is not None:
            batches = self._missed(sub.view, since)
            if batches is not None:
                replay_size = sum(f.size for b in batches for f in b.frames)
                snapshot = self.snapshot(sub.view)
                if replay_size <= sum(f.size for f in snapshot):
                    self.metrics.replays += 1
                    return Resume(None, batches)
                return Resume(snapshot, [])
        return Resume(self.snapshot(sub.view), [])

    def _resumable_tick(self, sub: Subscription, last_event_id: str | None) -> int | None:
        parts = (last_event_id or "").strip().split(".")
        if len(parts) != 3 or parts[0] != self.epoch or parts[2] != sub.tag:
            return None
        try:
            tick = int(parts[1])
        except ValueError:
            return None
        return tick if 0 <= tick <= self.index.tick else None

    def _missed(self, view: View, since: int) -> list[Batch] | None:
        """Batches of ``view`` after tick ``since``, or None if the log no longer has them."""
        if since < self.index.tick and (not self._replay or self._replay[0].tick > since + 1):
            return None
        if view.vehicles is not None:
            return None  # not logged (see publish): a snapshot, as large as one batch
        batches = []
        keys = view.watch_keys()
        if any(self._watched_since.get(key, since + 1) > since for key in keys):
            return None  # nobody watched it for a while: its frames were never made
        sub_cells = view.cells or frozenset()
        if view.plain and any(self._framed_since.get(c, since + 1) > since for c in sub_cells):
            return None  # nobody watched a cell for a while: its frames were never made
        for logged in self._replay:
            if logged.tick > since:
                if view.plain:
                    hits = [logged.frames[c] for c in sub_cells & logged.frames.keys()]
                else:
                    hits = [
                        f
                        for key in keys & logged.views.keys()
                        for f in logged.views[key]
                        if view.admits(f.cell)
                    ]
                if hits:
                    batches.append(Batch(logged.tick, hits))
        return batches

    def snapshot(self, view: View | Iterable[int]) -> list[Frame]:
        """Frames with every published vehicle of a view (or of cells); each cell's or
        narrowed key's built once per tick."""
        if not isinstance(view, View):
            return self._cell_snapshot(view)
        if view.plain:
            return self._cell_snapshot(view.cells or ())
        result = []
        for key in view.watch_keys():
            if key not in self._view_snapshots:
                self._view_snapshots[key] = self._key_snapshot(key)
            result += [f for f in self._view_snapshots[key] if view.admits(f.cell)]
        return result

    def _key_snapshot(self, key: ViewKey) -> list[Frame]:
        """A narrowed key's snapshot: a cell's vehicles of one fleet, or one vehicle."""
        if isinstance(key, tuple):
            cell, fleet = key
            state = self.index.cell_state(cell)
            if state is None:
                return []
            vids = {vid for vid, _ in state.names if self.index.fleet_of_vid(vid) == fleet}
            if not vids:
                return []
            state = CellState(
                cell,
                state.t_ms,
                positions=[p for p in state.positions if p.vid in vids],
                names=[n for n in state.names if n[0] in vids],
                stale=[vid for vid in state.stale if vid in vids],
            )
            return [Frame(cell, encode_snapshot(state))]
        vehicle = self.index.vehicle(key)
        if vehicle is None or vehicle.published is None:
            return []
        state = CellState(
            vehicle.cell,
            self.index.t_ms,
            positions=[vehicle.published],
            names=[(vehicle.vid, vehicle.vehicle_id)],
            stale=[vehicle.vid] if vehicle.stale else [],
        )
        step = Step.keyframe(
            vehicle.vid, key, vehicle.cell, vehicle.published, vehicle.stale
        )  # taken now: the steps of the next ticks count from it
        return [Frame(vehicle.cell, encode_snapshot(state), step=step)]

    def _cell_snapshot(self, cells: Iterable[int]) -> list[Frame]:
        result = []
        for cell in cells:
            if cell in self._snapshot_cache:
                frame = self._snapshot_cache[cell]
            else:
                state = self.index.cell_state(cell)
                frame = None if state is None else Frame(cell, encode_snapshot(state))
                self._snapshot_cache[cell] = frame
            if frame is not None:
                result.append(frame)
        return result


def area_tag(cells: frozenset[int], is_json: bool) -> str:
    """A short stable hash of an area and format, for event ids (live and replayed)."""
    return View(cells).tag(is_json)


@dataclass(frozen=True)
class _Logged:
    """One tick in the replay log: its cell frames and its narrowed views' frames."""

    tick: int
    frames: dict[int, Frame]
    views: dict[ViewKey, list[Frame]]
    size: int = 0
    """What the log's byte budget counts for this tick."""

    @classmethod
    def of(cls, tick: int, frames: dict[int, Frame], views: dict[ViewKey, list[Frame]]) -> _Logged:
        size = sum(f.held_bytes for f in frames.values())
        size += sum(f.held_bytes for view_frames in views.values() for f in view_frames)
        return cls(tick, frames, views, size)


def _forget(index: dict[Any, set[Subscription]], keys: Iterable[Any], sub: Subscription) -> None:
    """Take ``sub`` out of ``index`` under each of ``keys``, dropping emptied keys."""
    for key in keys:
        watchers = index[key]
        watchers.discard(sub)
        if not watchers:
            del index[key]
