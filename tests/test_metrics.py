"""tracker.metrics: histograms, the exposition read back by prometheus-client's own parser,
and /metrics of a real server moving with ingest and feeds."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import numpy as np
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, StartServer, ping, post_pings
from tests.sse import open_feed
from tracker.metrics import CONTENT_TYPE, Histogram, Metrics


@dataclass(frozen=True)
class Queued:
    """What a feed has queued (a stand-in for the hub's SubscriptionStatistics)."""

    queued_batches: int
    queued_bytes: int


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """Every family of an exposition: name -> (type, samples)."""
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def value(families: dict[str, tuple[str, list[Sample]]], family: str, sample: str = "") -> float:
    """The one sample named ``sample`` (default: the family's name) of ``family``."""
    (found,) = [s.value for s in families[family][1] if s.name == (sample or family)]
    return found


def buckets(families: dict[str, tuple[str, list[Sample]]], family: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts by their ``le``."""
    return {s.labels["le"]: s.value for s in families[family][1] if s.name == f"{family}_bucket"}


def test_histogram_counts_values_at_or_below_each_bound() -> None:
    histogram = Histogram([1, 10])
    for v in (0.5, 1, 1.5, 10, 11):
        histogram.observe(v)
    histogram.observe_many(np.array([-3.0, 1.0, 10.5, 1e9]))
    assert histogram.cumulative() == [("1.0", 4.0), ("10.0", 6.0), ("+Inf", 9.0)]
    assert histogram.count == 9 and histogram.sum == 0.5 + 1 + 1.5 + 10 + 11 - 3 + 1 + 10.5 + 1e9


def test_histogram_observe_many_of_nothing_changes_nothing() -> None:
    histogram = Histogram([0.5])
    histogram.observe_many(np.empty(0))
    assert histogram.count == 0 and histogram.sum == 0.0


def test_metrics_render_parses_with_every_family_typed() -> None:
    metrics = Metrics()
    metrics.pings_accepted += 3
    metrics.observe_tick(0.004)
    metrics.batch_pings.observe(3)
    metrics.observe_published(1000.0, np.array([999.5, 998.0, 1000.0]))
    metrics.feeds = lambda: [Queued(0, 0), Queued(3, 5000), Queued(12, 2_000_000)]
    metrics.bus_state = lambda: "degraded"
    metrics.gauges["vehicles"] = ("Vehicles.", lambda: 42)
    families = parse(metrics.render().decode())
    assert value(families, "tracker_pings_accepted", "tracker_pings_accepted_total") == 3
    assert families["tracker_tick_duration_seconds"][0] == "histogram"
    assert buckets(families, "tracker_tick_duration_seconds")["0.005"] == 1
    assert value(families, "tracker_ingest_batch_pings", "tracker_ingest_batch_pings_sum") == 3
    delays = buckets(families, "tracker_ping_delay_seconds")
    assert (delays["0.5"], delays["1.0"], delays["2.0"]) == (2, 2, 3)
    assert families["tracker_feed_outbox_batches"][0] == "histogram"
    assert buckets(families, "tracker_feed_outbox_batches") == {
        "0.0": 1,
        "1.0": 1,
        "2.0": 1,
        "5.0": 2,
        "10.0": 2,
        "20.0": 3,
        "+Inf": 3,
    }
    assert buckets(families, "tracker_feed_outbox_bytes")["+Inf"] == 3
    bus = {s.labels["state"]: s.value for s in families["tracker_bus_state"][1]}
    assert bus == {"local": 0, "connected": 0, "degraded": 1}
    assert value(families, "tracker_vehicles") == 42
    assert value(families, "process_resident_memory_bytes") > 1e6
    assert value(families, "process_open_fds") > 0
    assert families["tracker_pings_accepted"][0] == "counter"


def test_metrics_have_their_own_registry_not_the_global_one() -> None:
    before = prometheus_client.generate_latest()
    first, second = Metrics(), Metrics()  # no "duplicated timeseries" between the two
    first.pings_rejected += 1
    assert b"tracker_pings_rejected_total 1.0" in first.render()
    assert b"tracker_pings_rejected_total 0.0" in second.render()
    assert b"tracker_" not in prometheus_client.generate_latest()
    assert prometheus_client.generate_latest().count(b"\n# TYPE") == before.count(b"\n# TYPE")


def test_observe_published_of_a_big_tick_is_cheap() -> None:
    metrics = Metrics()
    ts = time.time() - np.random.default_rng(1).uniform(0, 5, 50_000)
    started = time.perf_counter()
    metrics.observe_published(time.time(), ts)
    assert time.perf_counter() - started < 0.05  # about 1 ms; per ping it would be ~50 ms
    assert metrics.ping_delay_s.count == 50_000


async def test_metrics_of_a_real_server_move_with_ingest_and_feeds(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=5, headers=INGEST_KEY) as client:
        response = await client.get("/metrics")
        assert response.headers["content-type"] == CONTENT_TYPE
        before = parse(response.text)
        async with open_feed(client, f"bbox={BERLIN_BBOX}") as feed:
            await feed.next_event()  # the snapshot
            now = time.time()
            pings = [
                ping("a", *BERLIN, now - 1.0),
                ping("b", *BERLIN, now - 1.0),
                ping("", 0, 0, 0),
            ]
            await post_pings(client, pings)
            await feed.until(lambda view: len(view.by_id()) == 2)
            after = parse((await client.get("/metrics")).text)
            assert value(after, "tracker_subscribers") == 1
            assert buckets(after, "tracker_feed_outbox_batches")["+Inf"] == 1
    assert value(before, "tracker_pings_accepted", "tracker_pings_accepted_total") == 0
    assert value(after, "tracker_pings_accepted", "tracker_pings_accepted_total") == 2
    assert value(after, "tracker_pings_rejected", "tracker_pings_rejected_total") == 1
    batch = buckets(after, "tracker_ingest_batch_pings")
    assert (batch["1.0"], batch["10.0"], batch["+Inf"]) == (0, 1, 1)
    delay = buckets(after, "tracker_ping_delay_seconds")
    assert (delay["0.5"], delay["2.0"], delay["+Inf"]) == (0, 2, 2)  # 1 s old + under a tick
    ticks = "tracker_tick_duration_seconds_count"
    assert value(after, "tracker_tick_duration_seconds", ticks) > 0
    assert value(after, "tracker_events_sent", "tracker_events_sent_total") >= 2
    assert value(after, "tracker_feeds_opened", "tracker_feeds_opened_total") == 1
    assert {s.labels["state"]: s.value for s in after["tracker_bus_state"][1]}["local"] == 1
    assert value(after, "process_cpu_seconds", "process_cpu_seconds_total") > 0
    assert value(after, "process_open_fds") > 0
