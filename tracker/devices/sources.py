"""The device sources that run as tasks: the MQTT subscriber and the GTFS-realtime pollers.

:func:`run_sources` is started into the core's ``tracker_nursery`` (``Tracker.run``) and
owns ``source_nursery``: the MQTT subscriber (with ``--mqtt``) and one poller per
``--gtfs-rt`` feed, each running until cancelled. A broker or feed that goes away is
retried by its own task and shows in ``/healthz`` warnings, never fatal; a crash (a bug)
propagates and brings the core down, like any core task's.
"""

from __future__ import annotations

import trio

from tracker.devices.gateway import DeviceGateway
from tracker.devices.gtfsrt import feeds_of
from tracker.devices.mqtt import MqttSource

__all__ = ["run_sources"]


async def run_sources(
    gateway: DeviceGateway, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the configured sources until cancelled; started at once (they connect later)."""
    config = gateway.config
    async with trio.open_nursery() as source_nursery:
        if config.mqtt:
            source_nursery.start_soon(MqttSource(config, gateway).run, name="mqtt")
        for feed in feeds_of(config, gateway):
            source_nursery.start_soon(feed.run, name=f"gtfs-rt {feed.name}")
        task_status.started()
