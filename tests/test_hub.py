"""The feed hub on its own: fan-out, outbox bounds, conflation, replay versus snapshot, resume ids.

No sockets: a real geo-index and frame step feed the hub, ticks are called by hand, and
waiting runs on Trio's ``autojump_clock``. The whole file runs in milliseconds.
"""

from __future__ import annotations

from typing import Any

import h3.api.basic_int as h3i
import pytest
import trio
import trio.testing

from tracker.config import TrackerConfig
from tracker.frames import encode_tick
from tracker.geoindex import GeoIndex
from tracker.hub import FeedHub, Resume, area_tag
from tracker.metrics import Metrics
from tracker.pings import Ping

RES = 7
A = h3i.latlng_to_cell(52.52, 13.405, RES)
B = next(c for c in h3i.grid_disk(A, 1) if c != A)
FAR = h3i.latlng_to_cell(48.137, 11.575, RES)
A_POINT, B_POINT, FAR_POINT = (h3i.cell_to_latlng(c) for c in (A, B, FAR))


class World:
    """An index, the frame step and a hub, ticked by hand at a fake time."""

    def __init__(self, **config: Any) -> None:
        self.config = TrackerConfig(**config)
        self.index = GeoIndex(
            resolution=RES, stale_after_s=60, remove_after_s=120, forget_after_ticks=10
        )
        self.metrics = Metrics()
        self.hub = FeedHub(self.config, self.index, self.metrics)
        self.now = 1000.0

    def ping(self, vid: str, point: tuple[float, float], step: float = 0.0) -> None:
        self.index.apply(
            Ping(vehicle_id=vid, lat=point[0] + step, lon=point[1], ts=self.now), self.now
        )

    def tick(self) -> int:
        """One tick, framing the cells the hub asks for (as ``Tracker.tick`` does)."""
        self.now += 1
        changes = self.index.advance(self.now)
        self.hub.publish(encode_tick(changes, only=self.hub.framed_cells()))
        return self.index.tick


def _snapshot_cells(resume: Resume) -> list[int]:
    assert resume.snapshot is not None
    return [frame.cell for frame in resume.snapshot]


def test_publish_queues_a_batch_only_for_subscribers_of_changed_cells() -> None:
    world = World()
    on_a = world.hub.subscribe(frozenset({A}), is_json=False)
    on_far = world.hub.subscribe(frozenset({FAR}), is_json=False)
    world.ping("v", A_POINT)
    tick = world.tick()
    stats = on_a.statistics()
    assert (stats.queued_batches, stats.owes_snapshot, stats.conflations) == (1, False, 0)
    assert stats.queued_bytes > 0
    assert on_far.statistics().queued_batches == 0
    owed = on_a.take()
    assert owed.snapshot is None and [b.tick for b in owed.batches] == [tick]
    assert [f.cell for f in owed.batches[0].frames] == [A]
    assert on_a.statistics().queued_batches == 0 and on_a.statistics().queued_bytes == 0


def test_one_batch_per_tick_holds_every_cell_of_the_area() -> None:
    world = World()
    sub = world.hub.subscribe(frozenset({A, B}), is_json=False)
    world.ping("a", A_POINT)
    world.ping("b", B_POINT)
    world.tick()
    (batch,) = sub.take().batches
    assert {f.cell for f in batch.frames} == {A, B}


def test_outbox_over_its_tick_bound_is_conflated_into_a_snapshot() -> None:
    world = World(outbox_max_ticks=3)
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    for step in range(3):
        world.ping("v", A_POINT, step * 1e-4)
        world.tick()
    assert sub.statistics().queued_batches == 3  # full, not yet over
    world.ping("v", A_POINT, 5e-4)
    world.tick()
    stats = sub.statistics()
    assert stats.owes_snapshot and stats.conflations == 1 and world.metrics.conflations == 1
    assert (stats.queued_batches, stats.queued_bytes) == (0, 0)
    world.ping("v", A_POINT, 6e-4)
    world.tick()  # owing a snapshot: nothing more is queued
    assert sub.statistics().queued_batches == 0
    owed = sub.take()
    assert owed.batches == [] and _snapshot_cells(owed) == [A]
    assert not sub.statistics().owes_snapshot


def test_outbox_over_its_byte_bound_is_conflated() -> None:
    world = World(outbox_max_bytes=1024, outbox_max_ticks=1000)
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    for n in range(200):  # ~200 full records: one frame larger than 1 KiB of base64
        world.ping(f"v{n}", A_POINT, n * 1e-5)
    world.tick()
    stats = sub.statistics()
    assert stats.owes_snapshot and stats.queued_bytes == 0 and stats.max_bytes == 1024


def test_statistics_of_the_hub_add_up_its_subscriptions() -> None:
    world = World(outbox_max_ticks=2)
    lagging = world.hub.subscribe(frozenset({A}), is_json=False)
    world.hub.subscribe(frozenset({A, B}), is_json=True)
    for step in range(3):
        world.ping("v", A_POINT, step * 1e-4)
        world.tick()
    stats = world.hub.statistics()
    assert (stats.subscribers, stats.watched_cells) == (2, 2)
    assert stats.owing_snapshot == 2 and stats.queued_batches == 0
    assert stats.replay_ticks == 3 and stats.replay_bytes > 0 and not stats.closed
    lagging.take()
    world.ping("v", A_POINT, 9e-4)
    world.tick()
    stats = world.hub.statistics()
    assert stats.owing_snapshot == 1 and stats.deepest_outbox_batches == 1
    assert stats.queued_batches == 1 and stats.queued_bytes == lagging.queued_bytes
    world.hub.unsubscribe(lagging)
    world.hub.unsubscribe(lagging)  # idempotent
    assert world.hub.statistics().subscribers == 1
    assert world.hub.subscriptions()[0].statistics().is_json


def test_unsubscribe_forgets_cells_nobody_watches() -> None:
    world = World()
    one = world.hub.subscribe(frozenset({A, B}), is_json=False)
    two = world.hub.subscribe(frozenset({B}), is_json=False)
    world.hub.unsubscribe(one)
    assert world.hub.statistics().watched_cells == 1
    world.hub.unsubscribe(two)
    assert world.hub.statistics().watched_cells == 0


def test_start_without_an_id_is_a_snapshot_of_published_state_only() -> None:
    world = World()
    world.ping("published", A_POINT)
    world.tick()
    world.ping("pending", A_POINT, 1e-3)  # applied, not yet published
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    first = world.hub.start(sub, None)
    assert first.snapshot is not None and len(first.snapshot) == 1
    assert world.index.cell_state(A) is not None
    assert [n for _, n in world.index.cell_state(A).names] == ["published"]  # type: ignore[union-attr]


def _resume_after(world: World, missed_moves: int, **area: Any) -> tuple[Resume, str]:
    """Follow a feed to an event id, miss ``missed_moves`` ticks of one vehicle, resume."""
    world.ping("v", A_POINT)
    world.tick()
    cells = frozenset(area.get("cells", {A}))
    sub = world.hub.subscribe(cells, is_json=False)
    world.hub.start(sub, None)
    last_id = world.hub.event_id(world.index.tick, sub)
    world.hub.unsubscribe(sub)
    for step in range(1, missed_moves + 1):
        world.ping("v", A_POINT, step * 1e-5)
        world.tick()
    again = world.hub.subscribe(frozenset({A}), is_json=area.get("is_json", False))
    return world.hub.start(again, last_id), last_id


def test_start_with_a_recent_id_replays_what_was_missed() -> None:
    world = World()
    resume, _ = _resume_after(world, 1)
    assert resume.snapshot is None and [b.tick for b in resume.batches] == [2]
    assert world.metrics.replays == 1


def test_start_with_the_latest_id_replays_nothing() -> None:
    world = World()
    resume, _ = _resume_after(world, 0)
    assert resume == Resume(None, [])


def test_start_with_a_replay_larger_than_a_snapshot_gets_the_snapshot() -> None:
    world = World()
    resume, _ = _resume_after(world, 6)  # six batches about one vehicle outweigh its snapshot
    assert resume.snapshot is not None and world.metrics.replays == 0


def test_start_with_an_id_older_than_the_replay_log_gets_a_snapshot() -> None:
    world = World(replay_ticks=2)
    resume, _ = _resume_after(world, 3)
    assert resume.snapshot is not None


def test_a_tick_frames_the_watched_cells_and_those_left_within_the_replay_window() -> None:
    world = World(replay_ticks=2)
    assert list(world.hub.framed_cells()) == []
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    assert set(world.hub.framed_cells()) == {A}
    world.hub.unsubscribe(sub)
    framed = []
    for _ in range(3):
        world.ping("a", A_POINT, world.now * 1e-7)
        world.ping("far", FAR_POINT, world.now * 1e-7)
        world.tick()
        framed.append(set(world.hub.framed_cells()))
    assert framed == [{A}, set(), set()]  # A's frames made for ticks 1 and 2, then not


def test_watching_a_cell_again_and_leaving_later_keeps_it_framed_longer() -> None:
    world = World(replay_ticks=2)
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    world.hub.unsubscribe(sub)  # at tick 0: framed until tick 2
    world.tick()
    again = world.hub.subscribe(frozenset({A, B}), is_json=False)
    world.hub.unsubscribe(again)  # at tick 1: framed until tick 3
    framed = []
    for _ in range(3):
        world.tick()
        framed.append(set(world.hub.framed_cells()))
    assert framed == [{A, B}, set(), set()]
    sub = world.hub.subscribe(frozenset({A}), is_json=False)  # watched while queued
    world.hub.unsubscribe(world.hub.subscribe(frozenset({A}), is_json=False))
    for _ in range(3):
        world.tick()
    assert set(world.hub.framed_cells()) == {A}  # still watched by ``sub``
    world.hub.unsubscribe(sub)
    for _ in range(2):
        world.tick()
    assert set(world.hub.framed_cells()) == set()


def test_start_with_an_id_of_a_tick_nobody_watched_gets_a_snapshot() -> None:
    """An id names a tick when the area was watched; one that names a tick when it was
    not (forged: the tag and epoch are no secret) finds frames never made: a snapshot,
    not a replay with holes."""
    world = World()
    world.ping("v", A_POINT)
    world.tick()
    forged = f"{world.hub.epoch}.{world.index.tick}.{area_tag(frozenset({A}), False)}"
    world.ping("v", A_POINT, 1e-5)
    world.tick()  # A is not framed: nobody watches it
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    resume = world.hub.start(sub, forged)
    assert resume.snapshot is not None and world.metrics.replays == 0
    world.ping("v", A_POINT, 2e-5)
    world.tick()  # framed now: an id of the tick before this one replays
    other = world.hub.subscribe(frozenset({A}), is_json=False)
    resume = world.hub.start(other, world.hub.event_id(world.index.tick - 1, sub))
    assert resume.snapshot is None and [b.tick for b in resume.batches] == [3]


def test_start_with_an_id_of_another_area_or_format_gets_a_snapshot() -> None:
    world = World()
    resume, _ = _resume_after(world, 1, cells={A, B})
    assert resume.snapshot is not None
    world = World()
    resume, _ = _resume_after(world, 1, is_json=True)
    assert resume.snapshot is not None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "0.1.2",
        "{epoch}.{tick}",
        "other.{tick}.{tag}",
        "{epoch}.999999999.{tag}",
        "{epoch}.-1.{tag}",
        "{epoch}.1e3.{tag}",
        "{epoch}." + "9" * 5000 + ".{tag}",
        "{epoch}.{tick}.{tag}.extra",
        "\x00\udcff.{tick}.{tag}",
    ],
)
def test_start_with_a_foreign_stale_or_garbage_id_gets_a_snapshot(bad: str) -> None:
    world = World()
    world.ping("v", A_POINT)
    tick = world.tick()
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    last_id = bad.format(epoch=world.hub.epoch, tick=tick, tag=sub.tag)
    resume = world.hub.start(sub, last_id)
    assert resume.snapshot is not None and resume.batches == []


def test_resnapshot_all_makes_every_subscription_owe_a_snapshot() -> None:
    world = World()
    subs = [world.hub.subscribe(frozenset({c}), is_json=False) for c in (A, B)]
    world.ping("v", A_POINT)
    world.tick()
    world.hub.resnapshot_all()
    assert all(s.statistics().owes_snapshot and s.statistics().queued_batches == 0 for s in subs)


def test_snapshot_frames_are_built_once_per_tick_and_shared() -> None:
    world = World()
    world.ping("v", A_POINT)
    world.tick()
    (first,) = world.hub.snapshot([A, FAR])
    (again,) = world.hub.snapshot([A])
    assert again is first
    world.tick()
    (after,) = world.hub.snapshot([A])
    assert after is not first


async def test_wait_wakes_on_a_batch_and_times_out_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World()
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    with trio.move_on_after(30) as quiet:
        await sub.wait()
    assert quiet.cancelled_caught  # nothing queued: sleeps until the heartbeat deadline

    async def publish_later() -> None:
        await trio.sleep(0.5)
        world.ping("v", A_POINT)
        world.tick()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_later)
        started = trio.current_time()
        with trio.fail_after(5):
            await sub.wait()
        assert trio.current_time() - started == pytest.approx(0.5)
    assert sub.statistics().queued_batches == 1


async def test_close_all_wakes_waiters_and_closes_later_subscriptions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World()
    sub = world.hub.subscribe(frozenset({A}), is_json=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sub.wait)
        await trio.sleep(1)
        world.hub.close_all()
    assert sub.statistics().closed
    late = world.hub.subscribe(frozenset({A}), is_json=False)
    assert late.statistics().closed and world.hub.statistics().closed
    with trio.fail_after(1):
        await late.wait()  # never sleeps once closed
