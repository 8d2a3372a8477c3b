"""OwnTracks over MQTT against a private mosquitto: published as the app does, attacked
(garbage, oversized and invalid payloads), and with a broker that goes away and returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.publish
import pytest
import trio

from tests.conftest import RunningServer, StartServer
from tests.mosquitto import Mosquitto
from tests.test_devices_owntracks import LOCATION
from tracker.cli import main
from tracker.config import ConfigError, TrackerConfig
from tracker.devices.gateway import SourceStats
from tracker.devices.mqtt import SOURCE, MqttBridge


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path)
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


def _location(lat: float = 52.52) -> bytes:
    now = str(int(time.time())).encode()
    return LOCATION.replace(b"1497476456", now).replace(b"48.85833", str(lat).encode())


async def _publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    """Publish one message (QoS 1) as the app does, from a worker thread."""
    await trio.to_thread.run_sync(
        lambda: paho.mqtt.publish.single(
            topic, payload, qos=1, port=broker.port, hostname="127.0.0.1"
        )
    )


async def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def _stats(server: RunningServer) -> SourceStats:
    return server.tracker.devices.source(SOURCE)


async def test_mqtt_locations_are_ingested_and_garbage_counted(
    start_server: StartServer, broker: Mosquitto
) -> None:
    server = await start_server(mqtt=broker.url)
    stats = _stats(server)
    await _until(lambda: stats.up)
    await _publish(broker, "owntracks/jane/phone", _location())
    await _until(lambda: server.tracker.index.vehicle("jane/phone") is not None)
    for payload in (
        b"\xff\xfe",
        b"{" * 10_000,
        b"[]",
        b'{"_type":"location","lat":"x"}',
        b" " * 200_000,
        _location(lat=100.0),
    ):
        await _publish(broker, "owntracks/mallory/phone", payload)
    await _publish(broker, "owntracks/" + "x" * 100 + "/phone", _location())
    await _publish(broker, "owntracks/jane/phone", b'{"_type":"lwt","tst":1}')
    await _until(lambda: sum(stats.rejected.values()) >= 7)
    assert stats.rejected == {"bad_body": 4, "too_large": 1, "invalid": 1, "bad_request": 1}
    assert stats.accepted == 1 and stats.last_seen is not None
    assert server.tracker.health().ok and not server.tracker.health().warnings


async def test_mqtt_broker_that_goes_away_is_degraded_then_reconnected(
    start_server: StartServer, broker: Mosquitto
) -> None:
    server = await start_server(mqtt=broker.url)
    stats = _stats(server)
    await _until(lambda: stats.up)
    broker.stop()
    await _until(lambda: not stats.up)
    health = server.tracker.health()
    assert health.ok  # degraded, not failing
    assert any("owntracks-mqtt is degraded" in w for w in health.warnings)
    broker.start()
    await _until(lambda: stats.up, timeout=20)
    await _publish(broker, "owntracks/jane/phone", _location())
    await _until(lambda: server.tracker.index.vehicle("jane/phone") is not None)


async def test_mqtt_unreachable_broker_is_degraded_not_fatal(start_server: StartServer) -> None:
    from tests.processes import free_port

    server = await start_server(mqtt=f"mqtt://127.0.0.1:{free_port()}")
    await _until(
        lambda: (
            "cannot connect" in _stats(server).problem or "disconnected" in _stats(server).problem
        )
    )
    assert server.tracker.health().ok


async def test_bridge_drops_and_counts_what_the_full_queue_cannot_take() -> None:
    """paho's thread never waits for Trio to catch up: beyond the queue, a drop."""
    send, receive = trio.open_memory_channel[tuple[str, bytes]](1)
    stats = SourceStats(SOURCE)
    bridge = MqttBridge(send, stats, "owntracks/+/+")

    def publish_three() -> None:
        for n in range(3):
            message = paho.mqtt.client.MQTTMessage(topic=b"owntracks/a/b")
            message.payload = b"{}" if n < 2 else b"x" * 100_000
            bridge.on_message(None, None, message)  # type: ignore[arg-type]

    await trio.to_thread.run_sync(publish_three)
    assert stats.rejected == {"dropped": 1, "too_large": 1}
    assert receive.receive_nowait() == ("owntracks/a/b", b"{}")


@pytest.mark.parametrize("url", ["redis://h", "mqtt://", "mqtt://h:99999", "h:1883"])
def test_config_refuses_a_bad_mqtt_url(url: str) -> None:
    with pytest.raises(ConfigError, match="--mqtt"):
        TrackerConfig(mqtt=url)


@pytest.mark.usefixtures("restore_root_logger")  # main() configures logging
def test_demo_over_mqtt_needs_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--protocol", "owntracks-mqtt"]) == 2
    assert "--mqtt" in capsys.readouterr().err
