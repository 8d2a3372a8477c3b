"""Where device reports enter the core: identity, per-device rate, per-source counts, tasks.

:class:`DeviceGateway` is what every device transport talks to (the OsmAnd and OwnTracks
HTTP routes, the MQTT subscriber, the GTFS-realtime pollers). It authenticates devices
(:class:`~tracker.devices.identity.Registry`), limits each device's rate, hands pings to
``Tracker.ingest_pings`` (the same checks, reasons and metrics as ``/ingest``) and
counts, per source, what was accepted, ignored and rejected with a reason code.

A ping the core rejects (too old, out of range) is acknowledged all the same, with its
reason in the reply and a count: the phone apps store and forward, and would resend a
refused report forever, blocking every later one behind it.

Owns no tasks: the sources that run on their own (MQTT, GTFS-realtime) are started by
``tracker.devices.sources`` and call into the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from tracker.config import TrackerConfig
from tracker.devices.identity import Registry
from tracker.errors import NothingAccepted, TrackerError
from tracker.fleets import DEFAULT_FLEET, Fleets, KeyFleet
from tracker.limits import IngestRate
from tracker.pings import IngestReply, Ping

__all__ = ["DeviceGateway", "Ingest", "SourceStats"]

logger = logging.getLogger(__name__)

INVALID = "invalid"
"""Reason code of a ping the core's checks rejected (its reason is in the reply)."""


class Ingest(Protocol):
    """``Tracker.ingest_pings``, as the gateway calls it."""

    def __call__(
        self,
        pings: Sequence[Ping | None],
        *,
        admit: Callable[[int], None],
        now: float | None,
        fleet: KeyFleet,
    ) -> IngestReply: ...


@dataclass
class SourceStats:
    """What one source delivered (see ``tracker.metrics.SourceCounts``)."""

    name: str
    accepted: int = 0
    ignored: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    last_seen: float | None = None
    up: bool = True
    problem: str = ""  # why it is not up, for /healthz

    def count(self, reason: str, pings: int = 1) -> None:
        """Count ``pings`` refused for ``reason`` (a short code, from a fixed set)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + pings

    def set_up(self, up: bool, problem: str = "") -> None:
        """Record whether the source works; a change is logged once."""
        if up != self.up:
            if up:
                logger.info("device source %s is up again", self.name)
            else:
                logger.warning("device source %s is degraded: %s", self.name, problem)
        self.up, self.problem = up, problem


def _unlimited(pings: int) -> None:
    """No rate limit (feeds and brokers are limited by their own queues)."""


class DeviceGateway:
    """Device identity, rates and per-source counts in front of the core's ingest."""

    def __init__(self, config: TrackerConfig, ingest: Ingest) -> None:
        self.config = config
        self.registry = Registry.for_config(config)
        self.fleets = Fleets(self.registry.fleets, config.ingest_key_list)
        """Every fleet and its keys (devices file and ingest keys): what ``/ingest`` checks."""
        self.sources: dict[str, SourceStats] = {}
        self._ingest = ingest
        self._rate = IngestRate(config.device_rate_per_s, what="device")

    def source(self, name: str) -> SourceStats:
        """The counts of source ``name`` (created on first use)."""
        stats = self.sources.get(name)
        if stats is None:
            stats = self.sources[name] = SourceStats(name)
        return stats

    def stats(self) -> Iterable[SourceStats]:
        """Every source's counts (for ``/metrics``)."""
        return list(self.sources.values())

    def warnings(self) -> list[str]:
        """One line per source that is not up (for ``/healthz``)."""
        down = [s for s in self.sources.values() if not s.up]
        return [f"device source {s.name} is degraded: {s.problem}" for s in down]

    def device_admit(self, source: str, device_id: str) -> Callable[[int], None]:
        """The rate limit of one device of ``source`` (429 beyond ``device_rate_per_s``)."""
        key = f"{source}\0{device_id}"
        return lambda pings: self._rate.admit(key, pings)

    def refuse(self, source: str, error: TrackerError, pings: int = 1) -> None:
        """Count a report ``source`` refused before it became a ping."""
        self.source(source).count(error.code, pings)

    def take(
        self,
        source: str,
        pings: Sequence[Ping],
        *,
        admit: Callable[[int], None] = _unlimited,
        now: float | None = None,
        fleet: str = DEFAULT_FLEET,
    ) -> IngestReply:
        """Ingest ``pings`` of devices of ``fleet`` from ``source``; rejected pings are
        counted and acknowledged.

        Raises only what refuses the whole batch before it is applied (a rate limit).
        """
        stats = self.source(source)
        try:
            reply = self._ingest(pings, admit=admit, now=now, fleet=KeyFleet(fleet))
        except NothingAccepted as exc:
            reply = msgspec.convert({"accepted": 0, "ignored": 0, **exc.details}, IngestReply)
        except TrackerError as exc:
            stats.count(exc.code, len(pings))
            raise
        stats.accepted += reply.accepted
        stats.ignored += reply.ignored
        rejected = reply.rejected_total or len(reply.rejected)
        if rejected:
            stats.count(INVALID, rejected)
        if reply.accepted:
            stats.last_seen = time.time()
        return reply
