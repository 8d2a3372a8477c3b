"""OwnTracks over MQTT: subscribe to a broker, and ingest the locations devices publish.

paho-mqtt (the ecosystem's client) runs its network loop in a thread of its own, which
connects, reconnects with backoff (``RECONNECT_MIN_S`` doubling to ``RECONNECT_MAX_S``),
and detects a dead broker by keep-alive (``KEEPALIVE_S``); each TCP connect has a deadline
(``CONNECT_TIMEOUT_S``). Its callbacks hand messages to Trio through
``trio.from_thread.run_sync`` into a bounded memory channel (``mqtt_queue_max``): when
Trio falls behind, new messages are dropped and counted, never queued without bound, and
paho's thread never waits on us for longer than one ``send_nowait``.

The Trio side drains the channel in batches (at most ``DRAIN_MAX`` messages per ingest
call), takes the device id from the topic (``owntracks/user/device`` -> ``user/device``),
admits it to the MQTT fleet (the broker authenticated it), limits its rate, decodes, and
hands the pings to the gateway. Every refusal is counted under source ``owntracks-mqtt``
with a reason code; a payload over ``MAX_PAYLOAD_BYTES`` is refused before decoding.

Task: :meth:`MqttSource.run`, in the gateway's ``source_nursery``, until cancelled; then
it disconnects and stops paho's thread (within ``STOP_TIMEOUT_S``). The source shows as
degraded in ``/healthz`` while not connected; that is never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import urllib.parse
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tracker.config import TrackerConfig, without_password
from tracker.devices.gateway import DeviceGateway, SourceStats
from tracker.devices.identity import DEFAULT_FLEET
from tracker.devices.owntracks import decode_message, device_from_topic
from tracker.devices.routes import DEVICE_MAX_BYTES
from tracker.errors import TrackerError
from tracker.pings import Ping

__all__ = ["SOURCE", "MqttBridge", "MqttSource"]

logger = logging.getLogger(__name__)

SOURCE = "owntracks-mqtt"
DEFAULT_PORT = 1883
KEEPALIVE_S = 15  # paho pings the broker this often; no answer in 1.5x: reconnect
CONNECT_TIMEOUT_S = 5.0  # deadline of one TCP connect to the broker
RECONNECT_MIN_S = 1  # first wait before reconnecting; doubles each failure...
RECONNECT_MAX_S = 30  # ... up to this
STOP_TIMEOUT_S = 5.0  # paho's thread gets this long to stop on shutdown
DRAIN_MAX = 1000  # messages per ingest call
MAX_PAYLOAD_BYTES = DEVICE_MAX_BYTES  # larger payloads are refused unread
QOS = 1

Message = tuple[str, bytes]
"""A message as it crosses from paho's thread: (topic, payload)."""


class MqttBridge:
    """paho's callbacks, run in paho's thread, handing everything to Trio.

    Nothing here touches Trio state directly: each callback calls one function in the
    Trio thread with ``trio.from_thread.run_sync``. A callback never raises (paho would
    stop its loop): once Trio has stopped, what arrives is dropped.
    """

    def __init__(
        self, send: trio.MemorySendChannel[Message], stats: SourceStats, topic: str
    ) -> None:
        self._send = send
        self._stats = stats
        self._topic = topic
        self._token = trio.lowlevel.current_trio_token()

    def _in_trio(self, function: Callable[..., object], *args: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # Trio is gone: nobody takes it
            trio.from_thread.run_sync(function, *args, trio_token=self._token)

    def on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._in_trio(self._stats.set_up, False, f"the broker refused us: {reason}")
            return
        client.subscribe(self._topic, qos=QOS)  # up once the broker acknowledges it

    def on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        """Up only once the broker took the subscription: a device's message published
        before then would not reach us, so "up" must not be claimed earlier."""
        failed = [reason for reason in reasons if reason.is_failure]
        if failed:
            self._in_trio(self._stats.set_up, False, f"the broker refused the topic: {failed[0]}")
        else:
            self._in_trio(self._stats.set_up, True)

    def on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._in_trio(self._stats.set_up, False, "cannot connect to the broker")

    def on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._in_trio(self._stats.set_up, False, f"disconnected: {reason}")

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if len(message.payload) > MAX_PAYLOAD_BYTES:
            self._in_trio(self._stats.count, "too_large")
            return
        self._in_trio(self._deliver, (message.topic, message.payload))

    def _deliver(self, item: Message) -> None:
        """In Trio: queue one message, or count it dropped when the queue is full."""
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._stats.count("dropped")


class MqttSource:
    """Subscribes to ``config.mqtt`` and ingests OwnTracks locations until cancelled."""

    def __init__(self, config: TrackerConfig, gateway: DeviceGateway) -> None:
        self.config = config
        self.gateway = gateway
        self.stats = gateway.source(SOURCE)
        self.fleet = config.mqtt_fleet or DEFAULT_FLEET

    def _client(self, bridge: MqttBridge) -> paho.Client:
        url = urllib.parse.urlsplit(self.config.mqtt)
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"tracker-{secrets.token_hex(6)}"
        )
        if url.username:
            client.username_pw_set(
                urllib.parse.unquote(url.username),
                urllib.parse.unquote(url.password) if url.password else None,
            )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.on_connect = bridge.on_connect
        client.on_connect_fail = bridge.on_connect_fail
        client.on_disconnect = bridge.on_disconnect
        client.on_subscribe = bridge.on_subscribe
        client.on_message = bridge.on_message
        client.connect_async(url.hostname or "", url.port or DEFAULT_PORT, keepalive=KEEPALIVE_S)
        return client

    async def run(self) -> None:
        """Connect (paho retries for ever), ingest what arrives; stop paho when cancelled."""
        send, receive = trio.open_memory_channel[Message](self.config.mqtt_queue_max)
        self.stats.set_up(False, "connecting")
        client = self._client(MqttBridge(send, self.stats, self.config.mqtt_topic))
        broker = without_password(self.config.mqtt)
        logger.info("subscribing to %s on %s", self.config.mqtt_topic, broker)
        client.loop_start()
        try:
            async with receive:
                while True:
                    batch = [await receive.receive()]
                    while len(batch) < DRAIN_MAX:
                        try:
                            batch.append(receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    self.ingest(batch)
        finally:
            client.disconnect()
            with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
                await trio.to_thread.run_sync(client.loop_stop, abandon_on_cancel=True)

    def ingest(self, messages: list[Message]) -> None:
        """Decode and take one batch of messages; refusals are counted, never raised."""
        pings: list[Ping] = []
        for topic, payload in messages:
            try:
                device_id = device_from_topic(topic)
                self.gateway.registry.admit(device_id, self.fleet)
                ping = decode_message(payload, device_id)
                if ping is not None:
                    self.gateway.device_admit(SOURCE, device_id)(1)
                    pings.append(ping)
            except TrackerError as exc:
                self.gateway.refuse(SOURCE, exc)
        if pings:
            with contextlib.suppress(TrackerError):  # refused whole: the gateway counted it
                self.gateway.take(SOURCE, pings, fleet=self.fleet)
