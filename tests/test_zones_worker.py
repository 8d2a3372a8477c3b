"""The zone engine off the loop (a worker thread, or a process of its own): the tick never
waits, the loop stays free, a slow engine catches up in order, what it cannot take is
counted and reported, and an engine process that dies takes the worker down."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.zones_http import descendants
from tests.conftest import StartServer, ping, post_pings
from tests.credentials import SECRET, SECURE, admin_token
from tests.processes import tracker_process
from tests.test_zones_engine import at, square
from tracker.geoindex import GeoIndex
from tracker.metrics import Metrics
from tracker.pings import Ping
from tracker.zones import worker as worker_module
from tracker.zones.cover import compile_zone
from tracker.zones.engine import MAX_RECORDED_PINGS, ZoneEngine
from tracker.zones.events import ZoneEvent
from tracker.zones.host import EngineProcessDied, ProcessHost
from tracker.zones.model import parse_zone
from tracker.zones.worker import ZoneWorker


class SlowEngine(ZoneEngine):
    """An engine whose every tick takes ``delay_s`` of its thread (GIL released)."""

    delay_s = 0.0

    def tick(self, now: float, *args: Any) -> list[ZoneEvent]:
        time.sleep(self.delay_s)
        return super().tick(now, *args)


def ping_and_tick(
    index: GeoIndex, worker: ZoneWorker, t: float, east_m: float, vehicle: str = "v1"
) -> None:
    """``vehicle``'s ping at ``t``, ``east_m`` east of the test square's corner, then the
    tick at ``t`` (queued for the engine, never decided here)."""
    lat, lon = at(east_m)
    pings = [Ping(vehicle_id=vehicle, lat=lat, lon=lon, ts=t)]
    assert index.apply(pings[0], t)
    worker.record(pings, t)
    worker.tick(t, index.advance(t))


class Rig:
    """A worker over a real geo-index, its events collected."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.index = GeoIndex(resolution=7, stale_after_s=30, remove_after_s=60)
        self.engine = SlowEngine(remove_after_s=60)
        self.engine.delay_s = delay_s
        self.emitted: list[ZoneEvent] = []
        self.metrics = Metrics()
        self.worker = ZoneWorker(self.engine, self, self.metrics, name_of=self.index.name_of)
        self.worker.put(compile_zone(parse_zone(square()), 7), 0.0, new=True)

    def emit(self, events: Any) -> None:
        self.emitted.extend(events)

    def step(self, t: float, east_m: float, vehicle: str = "v1") -> None:
        ping_and_tick(self.index, self.worker, t, east_m, vehicle)


async def test_the_tick_never_waits_for_a_slow_engine() -> None:
    rig = Rig(delay_s=0.2)
    gaps: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.worker.run)
        calls = []

        async def watch() -> None:
            while True:
                calls.append(rig.worker.figures)
                await trio.sleep(0.05)

        nursery.start_soon(watch)
        last = trio.current_time()
        for second in range(8):  # in, out, in, ... every 0.1 s of the loop
            started = time.perf_counter()
            rig.step(100.0 + second, 0 if second % 2 == 0 else 500)
            assert time.perf_counter() - started < 0.05  # queued, not decided
            await trio.sleep(0.1)
            gaps.append(trio.current_time() - last)
            last = trio.current_time()
        assert rig.worker.lag_s > 0.0  # behind: 0.2 s a tick, a tick every 0.1 s
        with trio.fail_after(5):
            while len(rig.emitted) < 8:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert max(gaps) < 0.25  # the loop went on while the thread slept
    assert [e.type for e in rig.emitted] == ["enter", "exit"] * 4  # in order, none lost
    assert rig.metrics.zone_events == 8
    assert max(call.ticks for call in calls) > 1  # it decided the ticks it missed at once


async def test_a_vehicle_stale_in_a_merged_tick_still_exits_after_its_last_ping() -> None:
    rig = Rig()
    rig.step(100.0, 0)
    for t in (110.0, 120.0, 131.0):  # v1 silent: stale at 131
        rig.worker.tick(t, rig.index.advance(t))
    assert rig.worker.ticks_merged == 3  # all four ticks in one: no ping between them
    events = rig.worker.decide_here()
    assert [(e.type, e.reason) for e in events] == [("enter", None), ("exit", "stale")]
    assert rig.worker.lag_s == 0.0


async def test_a_backlog_past_the_bound_is_dropped_counted_and_reported() -> None:
    rig = Rig()
    batch = [Ping(vehicle_id="v", lat=52.5, lon=13.4, ts=1)] * (MAX_RECORDED_PINGS // 2 + 1)
    rig.worker.record(batch, 1)
    assert rig.worker.problem() is None
    rig.worker.record(batch, 1)  # would exceed the bound: not taken
    assert rig.worker.pings_dropped == len(batch)
    assert "dropped pings" in (rig.worker.problem() or "")
    rig.worker.decide_here()
    rig.worker.record(batch, 1)  # the engine caught up: room again
    assert rig.worker.pings_dropped == len(batch)


async def test_no_zone_no_work() -> None:
    index = GeoIndex(resolution=7, stale_after_s=30, remove_after_s=60)
    worker = ZoneWorker(ZoneEngine(remove_after_s=60), Rig(), Metrics(), name_of=index.name_of)
    worker.record([Ping(vehicle_id="v", lat=52.5, lon=13.4, ts=1)], 1)
    worker.tick(1, index.advance(1))
    assert worker.decide_here() == [] and worker.lag_s == 0.0


async def test_a_slow_engine_never_holds_healthz(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine takes 0.5 s a call: /healthz answers at once and warns that it is behind
    (in a thread, where a slow engine can be slipped in)."""
    monkeypatch.setattr(worker_module, "LAG_WARNING_S", 0.3)
    server = await start_server(
        **SECURE, history=str(tmp_path / "h.sqlite3"), tick_s=0.05, zone_engine_thread=True
    )
    worker = server.tracker.zones.worker
    slow = SlowEngine(remove_after_s=60)
    slow.delay_s = 0.5
    worker.engine = slow
    headers = {"Authorization": f"Bearer {admin_token()}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        made = await http.post("/zones", json=square(), headers=headers)
        assert made.status_code == 201, made.text
        lat, lon = at(0)
        await post_pings(http, [ping("van", lat, lon, time.time())])
        waits: list[float] = []
        warned = False
        for _ in range(15):
            started = time.perf_counter()
            health = await http.get("/healthz")
            waits.append(time.perf_counter() - started)
            warned |= any("zone engine" in w for w in health.json()["warnings"])
            await trio.sleep(0.1)
    assert warned
    assert sorted(waits)[-2] < 0.15, waits  # the loop never waited for the engine
    metrics = (await _metrics(server.url)).splitlines()
    assert any(line.startswith("tracker_zone_ticks_merged ") for line in metrics)


async def _metrics(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return (await http.get("/metrics")).text


async def test_edits_during_ticks_end_where_the_book_is(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Zones created, replaced and deleted while pings flow and the engine decides: the
    engine ends up holding exactly the book's zones (in a thread, where it can be read)."""
    server = await start_server(
        **SECURE, history=str(tmp_path / "h.sqlite3"), tick_s=0.02, zone_engine_thread=True
    )
    headers = {"Authorization": f"Bearer {admin_token()}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:

        async def ping_all_along(stop: trio.Event) -> None:
            n = 0
            while not stop.is_set():
                lat, lon = at((n % 7) * 40 - 120)
                await post_pings(http, [ping(f"v{k}", lat, lon, time.time()) for k in range(50)])
                n += 1
                await trio.sleep(0.01)

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping_all_along, stop)
            for n in range(30):
                zone = square(id=f"z{n % 6}", half_m=50 + 10 * (n % 5))
                reply = await http.put(f"/zones/z{n % 6}", json=zone, headers=headers)
                assert reply.status_code in (200, 201), reply.text
                if n % 4 == 3:
                    assert (
                        await http.delete(f"/zones/z{n % 6}", headers=headers)
                    ).status_code == 204
            stop.set()
        await server.wait_for_ticks(3)
    worker = server.tracker.zones.worker
    with trio.fail_after(5):
        while worker.lag_s:
            await trio.sleep(0.05)
    held = sorted(z.zone.id for z in server.tracker.zones.all())
    assert sorted(worker.engine.zones.slot_of) == held


def _kill_engine_process(host: ProcessHost) -> None:
    assert host.pid is not None
    os.kill(host.pid, signal.SIGKILL)


async def test_the_engine_in_its_process_decides_as_in_a_thread() -> None:
    """The same pings and ticks through a process and through a thread: the same events
    (the zone's shapes prepared again on arrival); a process killed under the worker
    fails its task, which is what brings a tracker down."""
    rigs = [Rig(), Rig()]
    rigs[0].worker.process = True
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for rig in rigs:
                await nursery.start(rig.worker.run)
            for second in range(6):
                for rig in rigs:
                    rig.step(100.0 + second, 0 if second % 3 else 500, vehicle="a")
                    rig.step(100.0 + second, 500 if second % 2 else 0, vehicle="b")
                    await rig.worker.decide()
            nursery.cancel_scope.cancel()
    through_process, through_thread = (rig.emitted for rig in rigs)
    assert len(through_process) >= 6
    assert through_process == through_thread
    assert rigs[0].worker.figures.vehicles_known == 2


async def test_an_engine_process_that_dies_fails_the_worker() -> None:
    rig = Rig()
    rig.worker.process = True
    with pytest.raises(BaseExceptionGroup) as failed, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.worker.run)
            rig.step(100.0, 0)
            await rig.worker.decide()
            assert [e.type for e in rig.emitted] == ["enter"]
            host = rig.worker._host
            assert isinstance(host, ProcessHost)
            _kill_engine_process(host)
            rig.step(101.0, 500)
            await rig.worker.decide()
    assert failed.group_contains(EngineProcessDied)


async def test_a_tracker_without_zones_starts_no_engine_process() -> None:
    index = GeoIndex(resolution=7, stale_after_s=30, remove_after_s=60)
    engine = ZoneEngine(remove_after_s=60)
    worker = ZoneWorker(engine, Rig(), Metrics(), name_of=index.name_of, process=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        worker.record([Ping(vehicle_id="v", lat=52.5, lon=13.4, ts=1)], 1)
        worker.tick(1, index.advance(1))
        await trio.sleep(0.2)
        host = worker._host
        assert isinstance(host, ProcessHost) and host.pid is None
        nursery.cancel_scope.cancel()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_the_engine_process_ends_when_its_tracker_is_killed(tmp_path: Path) -> None:
    """kill -9 of ``tracker serve`` holding a zone: its engine's process (which the tracker
    cannot stop then) ends by itself, and so does its forkserver."""
    args = ("serve", "--port", "0", "--token-secrets", SECRET, "--ingest-keys", "test-ingest-key")
    headers = {"Authorization": f"Bearer {admin_token()}", "Content-Type": "application/json"}
    async with tracker_process(*args, "--history", str(tmp_path / "h.sqlite3")) as tracker:
        async with httpx.AsyncClient(base_url=tracker.url, timeout=10) as http:
            assert (await http.post("/zones", json=square(), headers=headers)).status_code == 201
            lat, lon = at(0)
            await post_pings(http, [ping("van", lat, lon, time.time())])
            with trio.fail_after(20):
                while len(below := descendants(tracker.child.process.pid)) < 2:
                    await trio.sleep(0.1)
        tracker.child.process.kill()
        tracker.child.process.wait(10)
    with trio.fail_after(10):
        while any(map(_alive, below)):
            await trio.sleep(0.1)


async def test_pings_are_decided_without_waiting_for_the_next_tick() -> None:
    """Pings queued after the last tick go to the engine with a tick of their own, at
    their time: an event waits neither for the next tick nor for its publishing step."""
    rig = Rig()
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.worker.run)
        lat, lon = at(0)
        pings = [Ping(vehicle_id="v1", lat=lat, lon=lon, ts=100.0)]
        assert rig.index.apply(pings[0], 100.0)
        rig.worker.record(pings, 100.0)  # no tick follows
        with trio.fail_after(5):
            while not rig.emitted:
                await trio.sleep(0.01)
        assert [(e.type, e.t) for e in rig.emitted] == [("enter", 100.0)]
        rig.worker.tick(100.5, rig.index.advance(100.5))  # the tick's own call: nothing new
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert [e.type for e in rig.emitted] == ["enter"]


async def test_calls_to_the_engine_are_paced() -> None:
    """Pings every 10 ms and no tick: calls start at least CALL_INTERVAL_S apart, each
    taking what came meanwhile, and every ping is decided."""
    rig = Rig()
    starts: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.worker.run)
        host = rig.worker._host
        assert host is not None
        apply = host.apply

        async def counted(ops: Any, *, write: bool) -> Any:
            starts.append(trio.current_time())
            return await apply(ops, write=write)

        host.apply = counted  # type: ignore[method-assign]
        for n in range(40):  # v0..v39 enter, one every 10 ms
            lat, lon = at(0)
            ping_ = Ping(vehicle_id=f"v{n}", lat=lat, lon=lon, ts=100.0 + n / 100)
            assert rig.index.apply(ping_, ping_.ts)
            rig.worker.record([ping_], ping_.ts)
            await trio.sleep(0.01)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert len(rig.emitted) == 40
    assert min(b - a for a, b in itertools.pairwise(starts)) >= worker_module.CALL_INTERVAL_S
    assert len(starts) <= 40 * 0.01 / worker_module.CALL_INTERVAL_S + 2
