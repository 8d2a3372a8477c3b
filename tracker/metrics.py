"""The service's metrics, and their Prometheus exposition (``GET /metrics``) by prometheus-client.

The hot paths pay what they paid before: a counter is a plain ``int`` attribute bumped
inline (no locks: one Trio thread), a histogram is a list of bucket counts
(:meth:`Histogram.observe` is one bisect; :meth:`Histogram.observe_many` takes a tick's
worth of values in one NumPy call), and gauges are functions read only when scraped. At
scrape time one collector turns all of it into metric families, and prometheus-client
writes the text format (version 0.0.4).

Each :class:`Metrics` has its own ``CollectorRegistry``, never the library's global one
(a process may hold several trackers: tests do), holding:

* ``tracker_*_total`` counters, ``tracker_<gauge>`` gauges (names that bench/ and the
  docs rely on), the ``tracker_tick_duration_seconds`` histogram and its
  ``tracker_tick_duration_max_seconds``;
* histograms of ingest batch size (``tracker_ingest_batch_pings``), ping-to-send delay
  (``tracker_ping_delay_seconds``: from a ping's ``ts`` to the tick that publishes it)
  and history commit time (``tracker_history_commit_seconds``);
* per-feed outbox depth as gauge histograms over the open feeds
  (``tracker_feed_outbox_batches``, ``tracker_feed_outbox_bytes``): one series per
  bucket, not per feed, so ten thousand feeds do not make ten thousand series;
* ``tracker_bus_state{state=...}``: 1 for the bus's current state, 0 for the others;
* process metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
  ``process_open_fds``, ...) and the Python runtime's (``python_gc_*``).

Owns no tasks and raises nothing.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["BUS_STATES", "CONTENT_TYPE", "FeedDepth", "Histogram", "Metrics", "SourceCounts"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""Media type of :meth:`Metrics.render`'s output (the classic Prometheus text format)."""

BUS_STATES: Final = ("local", "connected", "degraded")
"""Every state ``tracker_bus_state`` reports (``tracker.bus.Bus.state``)."""

TICK_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS: Final = (1, 10, 100, 1_000, 10_000, 50_000)  # pings; 50,000 is the default cap
DELAY_BUCKETS_S: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
COMMIT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTBOX_BATCH_BUCKETS: Final = (0, 1, 2, 5, 10, 20)  # outbox_max_ticks is 30 by default
OUTBOX_BYTE_BUCKETS: Final = (0, 1024, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024)


class Histogram:
    """Counts of observations per bucket (``value <= bound``), with their sum.

    Cheaper than prometheus-client's own (no lock, no per-observation objects) and able
    to take a whole array at once; exported by the collector at scrape time.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self._edges = np.array(self.bounds, dtype=np.float64)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: npt.NDArray[np.float64]) -> None:
        """Count every value of an array, in one pass (a tick's pings)."""
        if not len(values):
            return
        slots = np.searchsorted(self._edges, values, side="left")
        for slot, n in enumerate(np.bincount(slots, minlength=len(self.counts)).tolist()):
            self.counts[slot] += n
        self.sum += float(values.sum())

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(le, observations <= le)``, ending with ``+Inf``."""
        totals = itertools.accumulate(self.counts)
        labels = [*(repr(b) for b in self.bounds), "+Inf"]  # 1 -> "1.0", as the library
        return [(label, float(total)) for label, total in zip(labels, totals, strict=True)]


class FeedDepth(Protocol):
    """How much one open feed has queued (``tracker.hub.SubscriptionStatistics`` is one)."""

    @property
    def queued_batches(self) -> int:
        """Batches waiting in its outbox."""

    @property
    def queued_bytes(self) -> int:
        """Bytes (base64) waiting in its outbox."""


class SourceCounts(Protocol):
    """What one device source (a protocol, a feed) counts; read at scrape time."""

    name: str
    accepted: int
    ignored: int
    rejected: dict[str, int]  # reason code -> pings (a small fixed set of codes)
    last_seen: float | None  # wall time of the last accepted ping
    up: bool  # connected, or its last poll worked (listeners are always up)


def _no_sources() -> Iterable[SourceCounts]:
    return ()


def _counter(help_text: str) -> Any:
    """A counter field; its help text is what /metrics shows."""
    return field(default=0, metadata={"help": help_text})


def _no_feeds() -> Iterable[FeedDepth]:
    return ()


def _local_bus() -> str:
    return "local"


@dataclass
class Metrics:
    """Counters and histograms of the service; ``gauges``, ``feeds`` and ``bus_state`` are
    read when scraped (their owners set them: see ``tracker.service``)."""

    pings_accepted: int = _counter("Pings accepted into the geo-index.")
    pings_rejected: int = _counter("Pings rejected as invalid.")
    pings_refused_fleet: int = _counter(
        "Pings refused because their key may not report for the vehicle's fleet."
    )
    pings_ignored: int = _counter("Pings ignored as not newer than the vehicle's last one.")
    ticks: int = _counter("Ticks published.")
    view_frames: int = _counter(
        "Frames encoded for fleet and vehicle feeds: once per watched (cell, fleet) or "
        "vehicle and tick, however many feeds watch it."
    )
    events_sent: int = _counter("SSE events handed to connections (snapshots and batches).")
    bytes_sent: int = _counter("SSE bytes handed to connections, heartbeats included.")
    snapshots_sent: int = _counter("Snapshot events sent.")
    replays: int = _counter("Resumes served from the replay buffer.")
    conflations: int = _counter("Times a lagging feed's queue was replaced by a snapshot.")
    feeds_opened: int = _counter("Feed connections opened.")
    connections_refused: int = _counter("Connections closed at once: at max_connections.")
    connections_evicted: int = _counter("Idle connections closed to make room for a new one.")
    h2_streams_reaped: int = _counter("HTTP/2 streams reset after a write timeout without window.")
    h3_streams_reaped: int = _counter("HTTP/3 streams reset after a write timeout unacknowledged.")
    quic_datagrams_dropped: int = _counter("QUIC datagrams dropped: their connection was busy.")
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
    alert_events: int = _counter("Zone events handed to the alerts log.")
    alert_events_logged: int = _counter("Zone events committed to the alerts log.")
    alert_events_dropped: int = _counter(
        "Zone events dropped: the alerts log queue was over twice its bound, or not flushed."
    )
    alert_refused_pings: int = _counter("Pings refused with 503: the alerts log queue was full.")
    alert_store_errors: int = _counter("Alerts log store calls that failed (retried).")
    alert_events_expired: int = _counter("Alert events deleted for being past retention.")
    webhook_deliveries: int = _counter("Webhook requests answered 2xx.")
    webhook_failed_attempts: int = _counter("Webhook requests that failed (retried or not).")
    webhook_dead_letters: int = _counter("Events a webhook did not take after every attempt.")
    webhook_refused_targets: int = _counter(
        "Webhook requests not sent: the target resolved to an address the allow-list refuses."
    )
    history_committed_pings: int = _counter("Pings committed to the history store.")
    history_refused_pings: int = _counter(
        "Pings refused with 503 because the history queue was full."
    )
    history_store_errors: int = _counter(
        "History store calls that failed (commits are retried; nothing queued is dropped)."
    )
    history_compacted_positions: int = _counter("Positions regrouped into track chunks.")
    history_rejected_pings: int = _counter(
        "Accepted pings the history store refused to keep (kept aside in its rejected table)."
    )
    history_expired: int = _counter("Chunks and batches deleted for being past retention.")
    zone_events: int = _counter("Zone events decided (enter, exit, dwell, cross).")
    tick_seconds_max: float = 0.0
    tick_seconds: Histogram = field(default_factory=lambda: Histogram(TICK_BUCKETS_S))
    batch_pings: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    ping_delay_s: Histogram = field(default_factory=lambda: Histogram(DELAY_BUCKETS_S))
    history_commit_seconds: Histogram = field(default_factory=lambda: Histogram(COMMIT_BUCKETS_S))
    alert_commit_seconds: Histogram = field(default_factory=lambda: Histogram(COMMIT_BUCKETS_S))
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)
    feeds: Callable[[], Iterable[FeedDepth]] = _no_feeds
    bus_state: Callable[[], str] = _local_bus
    sources: Callable[[], Iterable[SourceCounts]] = _no_sources
    registry: CollectorRegistry = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_TrackerCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_tick(self, seconds: float) -> None:
        """Record how long one tick's work took."""
        self.ticks += 1
        self.tick_seconds.observe(seconds)
        self.tick_seconds_max = max(self.tick_seconds_max, seconds)

    def observe_published(self, now: float, ping_ts: npt.NDArray[np.float64]) -> None:
        """Record the delay of every ping a tick published at ``now`` (seconds since ts)."""
        self.ping_delay_s.observe_many(now - ping_ts)

    def render(self) -> bytes:
        """The Prometheus text exposition (version 0.0.4, :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _TrackerCollector(Collector):
    """Turns a :class:`Metrics` into metric families, at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        for counter in fields(m):
            if "help" in counter.metadata:
                value = getattr(m, counter.name)
                yield CounterMetricFamily(
                    f"tracker_{counter.name}", counter.metadata["help"], value
                )
        yield _histogram(
            "tracker_tick_duration_seconds", "Time spent publishing each tick.", m.tick_seconds
        )
        yield GaugeMetricFamily(
            "tracker_tick_duration_max_seconds", "Longest tick since start.", m.tick_seconds_max
        )
        yield _histogram(
            "tracker_ingest_batch_pings",
            "Pings per ingest batch (all, valid or not).",
            m.batch_pings,
        )
        yield _histogram(
            "tracker_ping_delay_seconds",
            "From a ping's timestamp to the tick that published it (device clock, network, "
            "queueing and the tick interval together).",
            m.ping_delay_s,
        )
        yield _histogram(
            "tracker_history_commit_seconds",
            "Time of each history commit (in the writer thread).",
            m.history_commit_seconds,
        )
        yield _histogram(
            "tracker_alert_commit_seconds",
            "Time of each alert log commit, from the tick's hand-over to its ids (thread "
            "hop, transaction, fsync).",
            m.alert_commit_seconds,
        )
        yield from _feed_depths(list(m.feeds()))
        state = m.bus_state()
        bus = GaugeMetricFamily(
            "tracker_bus_state",
            "1 for the bus's current state, 0 for the others.",
            labels=["state"],
        )
        for known in dict.fromkeys([*BUS_STATES, state]):
            bus.add_metric([known], 1.0 if known == state else 0.0)
        yield bus
        yield from _source_counts(list(m.sources()))
        for name, (help_text, read) in m.gauges.items():
            yield GaugeMetricFamily(f"tracker_{name}", help_text, read())


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, help_text, buckets=histogram.cumulative(), sum_value=histogram.sum
    )


def _feed_depths(depths: list[FeedDepth]) -> Iterator[Metric]:
    """How full the open feeds' outboxes are, as gauge histograms over the feeds."""
    batches, sizes = Histogram(OUTBOX_BATCH_BUCKETS), Histogram(OUTBOX_BYTE_BUCKETS)
    for depth in depths:
        batches.observe(depth.queued_batches)
        sizes.observe(depth.queued_bytes)
    for unit, spread in (("batches", batches), ("bytes", sizes)):
        yield GaugeHistogramMetricFamily(
            f"tracker_feed_outbox_{unit}",
            f"Open feeds by the {unit} queued in their outbox (sampled at scrape time).",
            buckets=spread.cumulative(),
            gsum_value=spread.sum,
        )


def _source_counts(sources: list[SourceCounts]) -> Iterator[Metric]:
    """Per device source: pings by outcome, rejections by reason, last seen, up."""
    pings = CounterMetricFamily(
        "tracker_device_pings",
        "Pings from a device source by outcome (accepted, ignored, rejected).",
        labels=["source", "outcome"],
    )
    rejected = CounterMetricFamily(
        "tracker_device_rejected",
        "Reports or pings a device source refused, by reason.",
        labels=["source", "reason"],
    )
    seen = GaugeMetricFamily(
        "tracker_device_last_seen_timestamp_seconds",
        "When a device source last delivered an accepted ping (Unix time).",
        labels=["source"],
    )
    up = GaugeMetricFamily(
        "tracker_device_source_up",
        "1 when a device source is connected or its last poll worked, else 0.",
        labels=["source"],
    )
    for source in sources:
        pings.add_metric([source.name, "accepted"], source.accepted)
        pings.add_metric([source.name, "ignored"], source.ignored)
        pings.add_metric([source.name, "rejected"], sum(source.rejected.values()))
        for reason, count in source.rejected.items():
            rejected.add_metric([source.name, reason], count)
        if source.last_seen is not None:
            seen.add_metric([source.name], source.last_seen)
        up.add_metric([source.name], 1.0 if source.up else 0.0)
    yield from (pings, rejected, seen, up)
