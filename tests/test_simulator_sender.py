"""The simulator against a real tracker: outages, bounded queue, and the demo end to end."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import httpx
import pytest
import trio

from simulator.fleet import FleetConfig
from simulator.sender import SendConfig, Sender
from tests.conftest import StartServer
from tests.mosquitto import Mosquitto
from tests.processes import free_port, tracker_process
from tests.sse import open_feed

CITY = "bbox=13.2,52.4,13.6,52.65"


async def test_sender_survives_a_tracker_that_starts_late(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    port = free_port()
    sender = Sender(
        FleetConfig(seed=3, vehicles=200),
        SendConfig(
            url=f"http://127.0.0.1:{port}",
            ingest_key="test-ingest-key",
            speedup=5,
            batch_size=500,
            quiet=True,
        ),
    )
    nursery.start_soon(sender.run)
    with trio.fail_after(10):
        while sender.stats.network_errors < 2:
            await trio.sleep(0.05)
    assert sender.stats.accepted == 0
    server = await start_server(port=port)
    with trio.fail_after(20):  # the server holds the pings before the sender reads its reply
        while server.tracker.index.vehicle_count < 150 or not sender.stats.accepted:
            await trio.sleep(0.05)
    assert sender.stats.dropped == 0


async def test_sender_queue_is_bounded_while_the_tracker_is_down() -> None:
    sender = Sender(
        FleetConfig(seed=3, vehicles=2000),
        SendConfig(url=f"http://127.0.0.1:{free_port()}", speedup=10, max_pending=1000, quiet=True),
    )
    with trio.move_on_after(2):
        await sender.run()
    assert sender.stats.generated > 1000
    assert sender.stats.pending <= 1000
    assert sender.stats.dropped >= sender.stats.generated - 1000


async def test_sender_reports_progress(start_server: StartServer) -> None:
    server = await start_server()
    out = io.StringIO()
    sender = Sender(
        FleetConfig(seed=1, vehicles=100),
        SendConfig(url=server.url, ingest_key="test-ingest-key", speedup=5, duration_s=2.5),
        out=out,
    )
    await sender.run()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and "pings/s" in lines[-1] and "accepted" in lines[-1]
    assert sender.stats.accepted > 0


async def test_demo_serves_a_moving_fleet_and_stops_cleanly() -> None:
    async with tracker_process("demo", "--port", "0", "--vehicles", "300") as demo:
        async with (
            httpx.AsyncClient(base_url=demo.url, timeout=10) as client,
            open_feed(client, CITY) as feed,
        ):
            await feed.until(lambda v: len(v.vehicles) >= 100, timeout=20)
            before = {vid: seen.position for vid, seen in feed.view.vehicles.items()}
            await feed.until(
                lambda v: (
                    sum(
                        1
                        for vid, seen in v.vehicles.items()
                        if vid in before and seen.position[1:3] != before[vid][1:3]
                    )
                    >= 20
                ),
                timeout=20,
            )
        assert await demo.interrupt() == 0, demo.output.decode()[-2000:]
    assert b"Traceback" not in demo.output


@pytest.mark.parametrize("protocol", ["osmand", "owntracks-http", "owntracks-mqtt"])
async def test_sender_speaks_each_device_protocol(
    start_server: StartServer, protocol: str, tmp_path: Path
) -> None:
    """``tracker simulate --protocol ...``: the fleet arrives through that protocol's path."""
    with contextlib.ExitStack() as stack:
        broker = Mosquitto(tmp_path)
        broker.start()
        stack.callback(broker.stop)
        server = await start_server(mqtt=broker.url if protocol == "owntracks-mqtt" else "")
        config = SendConfig(
            url=server.url,
            ingest_key="test-ingest-key",
            protocol=protocol,
            mqtt=broker.url,
            batch_size=20,
            quiet=True,
        )
        sender = Sender(FleetConfig(seed=3, vehicles=30), config)
        with trio.move_on_after(20):
            async with trio.open_nursery() as sim_nursery:
                sim_nursery.start_soon(sender.run)
                while server.tracker.index.vehicle_count < 25:
                    await trio.sleep(0.05)
                sim_nursery.cancel_scope.cancel()
        assert server.tracker.devices.source(protocol).accepted >= 25
        prefix = "" if protocol == "osmand" else "sim/"
        assert server.tracker.index.vehicle(prefix + sender.fleet.vehicle_ids[0]) is not None
