"""Ingest under attack (issue 13): future clocks, amplification, nesting and bad UTF-8.

Unit tests call ``ingest_body`` with an explicit ``now`` (no sockets, no clock); the HTTP
tests post to a real server and are bounded in time.
"""

from __future__ import annotations

import time

import httpx
import msgspec
import pytest
import trio

from tests.conftest import BERLIN, MUNICH, RunningServer, ping, post_pings
from tests.probes import health_probe
from tracker.config import MIB, TrackerConfig
from tracker.errors import NothingAccepted, PayloadTooLarge
from tracker.geoindex import GeoIndex
from tracker.ingest import ingest_body
from tracker.metrics import Metrics
from tracker.pings import MAX_REJECTIONS_LISTED, IngestReply

NOW = 1_764_000_000.0
MSGPACK = "application/msgpack"


def _index(config: TrackerConfig) -> GeoIndex:
    return GeoIndex(
        resolution=config.h3_resolution,
        stale_after_s=config.stale_after_s,
        remove_after_s=config.remove_after_s,
    )


def test_ingest_body_clamps_a_future_ping_so_the_next_real_one_applies() -> None:
    config = TrackerConfig()
    index = _index(config)

    def post(ts: float, where: tuple[float, float], now: float) -> tuple[int, int]:
        body = msgspec.msgpack.encode([ping("v", *where, ts)])
        reply = ingest_body(body, MSGPACK, index=index, config=config, metrics=Metrics(), now=now)
        return reply.accepted, reply.ignored

    assert post(NOW + config.max_future_s - 1, MUNICH, NOW) == (1, 0)  # ahead, accepted
    assert post(NOW + 1, BERLIN, NOW + 1) == (1, 0)  # the real one a second later applies
    assert index.pending(index.vehicle("v")).lat == BERLIN[0]  # type: ignore[arg-type,union-attr]


async def test_ingest_future_ping_beyond_tolerance_is_rejected_and_never_freezes(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        response = await post_pings(client, [ping("v", *MUNICH, time.time() + 290)])
        assert response.status_code == 422
        assert "future" in response.json()["rejected"][0]["error"]
        response = await post_pings(client, [ping("v", *MUNICH, time.time() + 9)])
        assert response.json()["accepted"] == 1
        await trio.sleep(0.05)
        real_ts = time.time()
        response = await post_pings(client, [ping("v", *BERLIN, real_ts)])
        assert response.json() == {"accepted": 1, "ignored": 0, "rejected": []}
        assert server.tracker.index.vehicle("v").last_ts == real_ts  # type: ignore[union-attr]


def _ingest(body: bytes, media: str = MSGPACK, **overrides: float) -> IngestReply:
    config = TrackerConfig(**overrides)  # type: ignore[arg-type]
    return ingest_body(body, media, index=_index(config), config=config, metrics=Metrics(), now=NOW)


def _garbage(json: bool, size: int = 8 * MIB - 64) -> bytes:
    """``size`` bytes of 1-byte integers: the issue's 8 MiB amplification body."""
    if json:
        return b"[" + b"1," * (size // 2 - 1) + b"1]"
    return b"\xdd" + (size - 5).to_bytes(4, "big") + b"\x01" * (size - 5)


@pytest.mark.parametrize("json", [False, True])
def test_ingest_body_counts_a_huge_garbage_array_before_decoding_its_items(json: bool) -> None:
    body = _garbage(json)
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge) as caught:
        _ingest(body, "application/json" if json else MSGPACK)
    elapsed = time.perf_counter() - started
    assert "at most 50000" in caught.value.message
    assert elapsed < 0.3, elapsed  # was 7.8 s (msgpack) and 3.6 s (JSON)


@pytest.mark.parametrize("json", [False, True])
def test_ingest_body_lists_the_first_rejections_and_counts_the_rest(json: bool) -> None:
    items: list[object] = [ping("ok", *BERLIN, NOW)]
    items += [1, "x", [], {"vehicle_id": "v"}, ping("bad", 95.0, 0.0, NOW)] * 9_999
    body = msgspec.json.encode(items) if json else msgspec.msgpack.encode(items)
    started = time.perf_counter()
    reply = _ingest(body, "application/json" if json else MSGPACK)
    assert time.perf_counter() - started < 2
    assert reply.accepted == 1
    assert reply.rejected_truncated and reply.rejected_total == len(items) - 1
    assert [r.index for r in reply.rejected] == list(range(1, MAX_REJECTIONS_LISTED + 1))
    assert "band" in reply.rejected[4].error and "map" in reply.rejected[0].error
    encoded = msgspec.json.decode(msgspec.json.encode(reply))
    assert encoded["rejected_total"] == len(items) - 1 and encoded["rejected_truncated"] is True


def test_ingest_reply_without_a_cut_keeps_its_shape() -> None:
    reply = _ingest(msgspec.msgpack.encode([ping("ok", *BERLIN, NOW), 1]))
    assert msgspec.json.decode(msgspec.json.encode(reply)) == {
        "accepted": 1,
        "ignored": 0,
        "rejected": [{"index": 1, "error": reply.rejected[0].error}],
    }


def test_nothing_accepted_says_when_its_list_was_cut() -> None:
    with pytest.raises(NothingAccepted) as caught:
        _ingest(msgspec.msgpack.encode([1] * 500))
    body = caught.value.body()
    assert len(body["rejected"]) == MAX_REJECTIONS_LISTED
    assert body["rejected_total"] == 500 and body["rejected_truncated"] is True


DEEP = 5_000
HOSTILE_BODIES = {
    "msgpack array nested deep": b"\x91" * DEEP + b"\xc0",
    "msgpack deep in an unknown field": b"\x91\x85\xaavehicle_id\xa1a\xa3lat\x01\xa3lon\x01"
    b"\xa2ts\x01\xa1x" + b"\x91" * DEEP + b"\xc0",
    "JSON array nested deep": b"[" * DEEP + b"]" * DEEP,
    "JSON deep in an unknown field": b'[{"vehicle_id":"a","lat":1,"lon":1,"ts":1,"x":'
    + b"[" * DEEP
    + b"]" * DEEP
    + b"}]",
    "msgpack bad UTF-8 id": b"\x91\x84\xaavehicle_id\xa2\xff\xfe\xa3lat\x01\xa3lon\x01\xa2ts\x01",
    "msgpack bad UTF-8 key": b"\x91\x85\xaavehicle_id\xa1a\xa3lat\x01\xa3lon\x01\xa2ts\x01"
    b"\xa2\xc3\x28\x01",
    "JSON bad UTF-8 id": b'[{"vehicle_id":"\xff\xfe","lat":1,"lon":1,"ts":1}]',
    "JSON huge integer": b'[{"vehicle_id":"a","lat":' + b"9" * 400 + b',"lon":1,"ts":1}]',
    "JSON 10**400 float": b'[{"vehicle_id":"a","lat":1e400,"lon":1,"ts":1}]',
    "JSON 2**70": b'[{"vehicle_id":"a","lat":1180591620717411303424,"lon":1,"ts":1}]',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
async def test_ingest_answers_hostile_bodies_with_4xx(client: httpx.AsyncClient, name: str) -> None:
    body = HOSTILE_BODIES[name]
    media = "application/json" if name.startswith("JSON") else MSGPACK
    with trio.fail_after(5):
        response = await client.post("/ingest", content=body, headers={"Content-Type": media})
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"] in {"bad_body", "nothing_accepted"}
        assert (await client.get("/healthz")).status_code == 200


async def test_ingest_garbage_body_over_http_is_refused_fast_and_health_answers(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    body = _garbage(json=False)
    with trio.fail_after(10):
        async with health_probe(server.url, interval_s=0.01) as probe:
            await trio.sleep(0.05)
            response = await client.post("/ingest", content=body, headers={"Content-Type": MSGPACK})
    assert response.status_code == 413
    assert probe.worst < 3.0, probe.worst  # was 7.8 s before the count came first
