"""HTTP/2 streams that get no flow-control window: bounded, conflated and reaped like HTTP/1.1."""

from __future__ import annotations

from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httpx
import pytest
import trio
import trio.testing

from tests.conftest import BERLIN_BBOX, INGEST_KEY, StartServer
from tests.rawhttp import move_fleet
from tracker.h2flow import HIGH_WATER, BoundedStreamBuffer, StreamStalled

# --- the buffer alone ----------------------------------------------------------------------


async def test_push_blocks_at_high_water_and_zero_length_pops_do_not_release_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    buffer = BoundedStreamBuffer(write_timeout_s=30)
    pushed = trio.Event()

    async def write() -> None:
        await buffer.push(b"x" * HIGH_WATER)
        pushed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        for _ in range(100):  # what Hypercorn's sender does while the window is 0
            assert await buffer.pop(0) == b""
            await trio.sleep(0.1)
        assert not pushed.is_set()
        assert len(buffer.buffer) == HIGH_WATER
        await buffer.pop(1)  # one byte left for the peer: the writer may go on
        await pushed.wait()


async def test_push_without_progress_for_the_write_timeout_raises_stalled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    buffer = BoundedStreamBuffer(write_timeout_s=5)
    started = trio.current_time()

    async def trickle() -> None:  # a byte now and then is progress: the clock restarts
        for _ in range(3):
            await trio.sleep(4)
            await buffer.pop(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(StreamStalled):
            await buffer.push(b"x" * (HIGH_WATER + 10))
    assert trio.current_time() - started == pytest.approx(12 + 5)


async def test_drain_without_progress_raises_stalled_and_close_releases_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    buffer = BoundedStreamBuffer(write_timeout_s=5)
    await buffer.push(b"end of response")
    buffer.set_complete()
    with pytest.raises(StreamStalled):
        await buffer.drain()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(buffer.drain)
        await trio.sleep(1)
        await buffer.close()
    assert buffer.complete


# --- over a real socket, with a raw h2 client ---------------------------------------------


class StingyClient:
    """An h2c client that reads every byte the server sends but never grants window."""

    def __init__(self, stream: trio.SocketStream, *, zero_window: bool) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if zero_window:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.reset: set[int] = set()
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.received = 0

    async def open_feeds(self, count: int, host: str) -> list[int]:
        ids = []
        for _ in range(count):
            stream_id = self.conn.get_next_available_stream_id()
            path = f"/feed?bbox={BERLIN_BBOX}"
            request = [(":method", "GET"), (":scheme", "http"), (":authority", host)]
            self.conn.send_headers(stream_id, [*request, (":path", path)], end_stream=True)
            ids.append(stream_id)
        await self.stream.send_all(self.conn.data_to_send())
        return ids

    async def read_forever(self) -> None:
        while data := await self.stream.receive_some(65536):
            self.received += len(data)
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.StreamReset):
                    self.reset.add(event.stream_id)
                elif isinstance(event, h2.events.ResponseReceived):
                    self.headers[event.stream_id] = dict(event.headers)
            if out := self.conn.data_to_send():  # settings acks, never WINDOW_UPDATE
                await self.stream.send_all(out)


@pytest.mark.parametrize("zero_window", [True, False], ids=["window-0", "window-64k-then-none"])
async def test_stalled_h2_streams_are_conflated_bounded_and_reaped(
    start_server: StartServer, zero_window: bool
) -> None:
    server = await start_server(outbox_max_ticks=4, write_timeout_s=2.0)
    metrics, hub = server.tracker.metrics, server.tracker.hub
    host = urlsplit(server.url).hostname
    assert host is not None
    with trio.fail_after(9):
        async with (
            httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as http,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(move_fleet, http)
            stingy = StingyClient(
                await trio.open_tcp_stream(host, urlsplit(server.url).port or 80),
                zero_window=zero_window,
            )
            nursery.start_soon(stingy.read_forever)
            ids = await stingy.open_feeds(5, host)
            while metrics.conflations < 5:  # every stalled stream's outbox overflowed
                await trio.sleep(0.05)
            handed = metrics.bytes_sent
            await trio.sleep(0.5)  # ten more ticks of news
            # The app is blocked on each stream: nothing more is handed to Hypercorn.
            assert metrics.bytes_sent == handed
            while hub.subscriber_count:  # reaped after the write timeout
                await trio.sleep(0.05)
            while stingy.reset != set(ids):
                await trio.sleep(0.05)
            assert metrics.h2_streams_reaped == 5
            assert all(h[b":status"] == b"200" for h in stingy.headers.values())
            nursery.cancel_scope.cancel()


async def test_shutdown_keeps_its_grace_with_stalled_h2_streams(start_server: StartServer) -> None:
    server = await start_server(outbox_max_ticks=4, write_timeout_s=60, shutdown_grace_s=0.5)
    metrics = server.tracker.metrics
    host = urlsplit(server.url).hostname
    assert host is not None
    async with trio.open_nursery() as client_nursery:
        stingy = StingyClient(
            await trio.open_tcp_stream(host, urlsplit(server.url).port or 80), zero_window=True
        )
        client_nursery.start_soon(stingy.read_forever)
        await stingy.open_feeds(3, host)
        async with (
            httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as http,
            trio.open_nursery() as fleet_nursery,
        ):
            fleet_nursery.start_soon(move_fleet, http)
            with trio.fail_after(5):
                while metrics.conflations < 3:  # all three feeds are blocked in a write
                    await trio.sleep(0.05)
            fleet_nursery.cancel_scope.cancel()
        started = trio.current_time()
        server.shutdown.set()
        with trio.fail_after(0.5 + 1.5):
            await server.stopped.wait()
        assert trio.current_time() - started >= 0.45
        client_nursery.cancel_scope.cancel()
