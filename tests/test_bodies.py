"""Request bodies: a deadline, a minimum rate, a cap on how many are read at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from tests.conftest import FAST, RunningServer, StartServer
from tests.rawhttp import connect, read_response
from tracker.bodies import BodyReads
from tracker.config import TrackerConfig
from tracker.errors import PayloadTooLarge, RequestTimeout, ServiceBusy
from tracker.metrics import Metrics

# --- the reader alone, on a fake clock -----------------------------------------------------


def _reads(**overrides: object) -> tuple[BodyReads, Metrics]:
    config = TrackerConfig(**{**FAST, **overrides})  # type: ignore[arg-type]
    metrics = Metrics()
    return BodyReads(config, metrics), metrics


async def _chunks(size: int, every_s: float, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        await trio.sleep(every_s)
        yield b"x" * size


async def test_a_body_at_the_minimum_rate_may_take_longer_than_the_base_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reads, _ = _reads(body_timeout_s=1, body_min_rate_bytes_s=1000)
    started = trio.current_time()
    body = await reads.read(_chunks(1000, 0.9, 20))  # 18 s at 1,111 bytes/s
    assert len(body) == 20_000 and trio.current_time() - started > 17


async def test_a_trickle_is_cut_at_the_base_timeout(autojump_clock: trio.testing.MockClock) -> None:
    reads, metrics = _reads(body_timeout_s=2, body_min_rate_bytes_s=1000)
    started = trio.current_time()
    with pytest.raises(RequestTimeout):
        await reads.read(_chunks(1, 0.5, 1000))  # 2 bytes/s
    assert trio.current_time() - started == pytest.approx(2, abs=0.01)
    assert metrics.bodies_timed_out == 1 and reads.reading == 0


async def test_a_body_over_its_limit_is_413_as_soon_as_it_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reads, _ = _reads()
    with pytest.raises(PayloadTooLarge):
        await reads.read(_chunks(600, 0.01, 10_000), limit=1000)


async def test_bodies_beyond_max_body_reads_are_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reads, metrics = _reads(max_body_reads=2, body_timeout_s=5)
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(reads.read, _chunks(1, 1, 3))
        await trio.sleep(0.5)
        with pytest.raises(ServiceBusy):
            await reads.read(_chunks(1, 1, 3))
    assert metrics.bodies_refused == 1
    assert len(await reads.read(_chunks(1, 0.1, 3))) == 3  # free again


# --- over real sockets ---------------------------------------------------------------------


async def _trickle_session(server: RunningServer, gap_s: float = 0.1) -> trio.SocketStream:
    """POST /session announcing 1 KiB of body, then a byte every ``gap_s`` in the background."""
    stream = await connect(server)
    await stream.send_all(
        b"POST /session HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1024\r\n\r\n{"
    )
    return stream


async def _drip(stream: trio.SocketStream, gap_s: float) -> None:
    try:
        for _ in range(1023):
            await trio.sleep(gap_s)
            await stream.send_all(b" ")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_a_slow_body_gets_408_within_the_deadline(start_server: StartServer) -> None:
    server = await start_server(body_timeout_s=0.5)
    stream = await _trickle_session(server)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drip, stream, 0.1)
        response = await read_response(stream, timeout=3)
        nursery.cancel_scope.cancel()
    assert 0.4 < trio.current_time() - started < 2
    assert response.status == 408
    assert response.json()["error"] == "request_timeout"  # type: ignore[index]
    assert response.headers["connection"] == "close"
    assert server.tracker.metrics.bodies_timed_out == 1
    await stream.aclose()


async def test_many_slow_uploads_neither_hold_the_server_nor_stop_healthz(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections=40, max_body_reads=10, body_timeout_s=1.5)
    metrics = server.tracker.metrics
    with trio.fail_after(8):
        async with trio.open_nursery() as attackers:
            for _ in range(80):
                stream = await _trickle_session(server)
                attackers.start_soon(_drip, stream, 0.3)
            async with httpx.AsyncClient(base_url=server.url) as client:
                for _ in range(10):
                    asked = trio.current_time()
                    assert (await client.get("/healthz", timeout=2)).status_code == 200
                    assert trio.current_time() - asked < 1
                    await trio.sleep(0.2)
            attackers.cancel_scope.cancel()
    assert metrics.bodies_refused + metrics.connections_refused >= 40
    assert metrics.bodies_timed_out >= 1  # the ten that got a slot were cut
