"""Service counters and their Prometheus text rendering for ``GET /metrics``.

Plain attributes bumped inline on the hot paths (no locks: one Trio thread); gauges are
read from their owners at scrape time. Owns no tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Metrics"]


def _counter(help_text: str) -> Any:
    """A counter field; its help text is what /metrics shows."""
    return field(default=0, metadata={"help": help_text})


@dataclass
class Metrics:
    """Counters of the service; ``gauges`` are sampled when scraped."""

    pings_accepted: int = _counter("Pings accepted into the geo-index.")
    pings_rejected: int = _counter("Pings rejected as invalid.")
    pings_ignored: int = _counter("Pings ignored as not newer than the vehicle's last one.")
    ticks: int = _counter("Ticks published.")
    events_sent: int = _counter("SSE events handed to connections (snapshots and batches).")
    bytes_sent: int = _counter("SSE bytes handed to connections, heartbeats included.")
    snapshots_sent: int = _counter("Snapshot events sent.")
    replays: int = _counter("Resumes served from the replay buffer.")
    conflations: int = _counter("Times a lagging feed's queue was replaced by a snapshot.")
    feeds_opened: int = _counter("Feed connections opened.")
    connections_refused: int = _counter("Connections closed at once: at max_connections.")
    connections_evicted: int = _counter("Idle connections closed to make room for a new one.")
    h2_streams_reaped: int = _counter("HTTP/2 streams reset after a write timeout without window.")
    bodies_timed_out: int = _counter("Request bodies too slow to arrive (408).")
    bodies_refused: int = _counter("Request bodies refused at max_body_reads (503).")
    bus_forwarded_pings: int = _counter("Pings forwarded to other instances (Redis bus).")
    bus_received_pings: int = _counter("Pings received from other instances (Redis bus).")
    bus_loaded_pings: int = _counter("Vehicle states loaded from Redis for newly watched shards.")
    bus_dropped_pings: int = _counter("Pings that could not be forwarded (Redis down or slow).")
    bus_reconnects: int = _counter("Times the Redis subscriber lost its connection.")
    bus_bad_messages: int = _counter("Bus messages that did not decode.")
    bus_bad_pings: int = _counter(
        "Pings from Redis (messages or state) that /ingest would reject; skipped."
    )
    bus_newer_messages: int = _counter(
        "Bus messages of a newer version (read by their known fields: a mixed-version fleet)."
    )
    bus_republished_pings: int = _counter(
        "Vehicle positions published again after a Redis outage (Redis had none newer)."
    )
    tick_seconds_sum: float = 0.0
    tick_seconds_max: float = 0.0
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)

    def observe_tick(self, seconds: float) -> None:
        """Record how long one tick's work took."""
        self.ticks += 1
        self.tick_seconds_sum += seconds
        self.tick_seconds_max = max(self.tick_seconds_max, seconds)

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4) of every metric."""
        lines: list[str] = []
        for counter in fields(self):
            if "help" in counter.metadata:
                value = getattr(self, counter.name)
                _emit(
                    lines,
                    f"tracker_{counter.name}_total",
                    "counter",
                    counter.metadata["help"],
                    value,
                )
        lines += [
            "# HELP tracker_tick_duration_seconds Time spent publishing each tick.",
            "# TYPE tracker_tick_duration_seconds summary",
            f"tracker_tick_duration_seconds_sum {self.tick_seconds_sum:.6f}",
            f"tracker_tick_duration_seconds_count {self.ticks}",
        ]
        _emit(
            lines,
            "tracker_tick_duration_max_seconds",
            "gauge",
            "Longest tick since start.",
            self.tick_seconds_max,
        )
        for name, (help_text, read) in self.gauges.items():
            _emit(lines, f"tracker_{name}", "gauge", help_text, read())
        return "\n".join(lines) + "\n"


def _emit(lines: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    shown = str(value) if isinstance(value, int) else repr(float(value))
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {shown}"]
