"""Vehicle metadata shared between instances on a Redis bus (two real tracker processes on
a private redis-server): a change on one is read on the other at once, concurrent changes
converge on what Redis holds, a Redis that lost its data is seeded again, a Redis that
does not answer gets the change refused (503; made or not, every instance ends alike and a
retry settles it), and what is not metadata in Redis is skipped."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import httpx
import trio

from tests.credentials import SECRET, admin_token
from tests.redis_server import RedisServer, tracker_instances

ADMIN = {"Authorization": f"Bearer {admin_token(ttl_s=3600)}"}
VAN = {"name": "Van 12", "kind": "van", "plate": "B-XY 12", "properties": {"depot": "Nord"}}


async def _read(http: httpx.AsyncClient, vehicles: str) -> Any:
    answer = await http.get("/meta", params={"vehicles": vehicles}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _until(http: httpx.AsyncClient, vehicles: str, expected: object) -> None:
    """Wait (5 s at most) until ``GET /meta`` on ``http`` reads ``expected``."""
    with trio.fail_after(5):
        while await _read(http, vehicles) != expected:
            await trio.sleep(0.05)


async def _settled(redis: RedisServer, vehicle: str, *instances: httpx.AsyncClient) -> Any:
    """Wait (5 s at most) until every instance reads what Redis holds for ``vehicle``."""
    with trio.fail_after(5):
        while True:
            held = (await _hash(redis)).get(vehicle.encode())
            expected = {} if held is None else {vehicle: json.loads(held)}
            if all([await _read(http, vehicle) == expected for http in instances]):
                return expected
            await trio.sleep(0.05)


@asynccontextmanager
async def _two(
    redis: RedisServer, *options: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Clients of two tracker instances on ``redis``, once ``van-12``, set to :data:`VAN`
    on the first, reads so on both."""
    async with (
        tracker_instances(redis, 2, "--token-secrets", SECRET, *options) as (a, b),
        httpx.AsyncClient(base_url=a.url, timeout=10) as to_a,
        httpx.AsyncClient(base_url=b.url, timeout=10) as to_b,
    ):
        assert (await to_a.put("/meta/van-12", json=VAN, headers=ADMIN)).status_code == 200
        assert await _read(to_a, "van-12") == {"van-12": VAN}  # at once where it was made
        await _until(to_b, "van-12", {"van-12": VAN})
        yield to_a, to_b


async def _hash(redis: RedisServer) -> dict[bytes, bytes]:
    async with coredis.Redis.from_url(redis.url, stream_timeout=5, connect_timeout=5) as client:
        return await client.hgetall("trk:meta")


async def test_a_change_on_one_instance_is_read_on_the_other(redis: RedisServer) -> None:
    async with _two(redis) as (to_a, to_b):
        assert (await to_b.delete("/meta/van-12", headers=ADMIN)).status_code == 200
        assert await _read(to_b, "van-12") == {}
        await _until(to_a, "van-12", {})
        # Both instances change one vehicle at the same time, many times: all converge on
        # what Redis holds, the last change Redis made.
        async with trio.open_nursery() as nursery:
            for http, name in ((to_a, "a"), (to_b, "b")):
                for step in range(15):
                    body = {"name": f"{name}{step}"}
                    nursery.start_soon(
                        lambda h=http, b=body: h.put("/meta/v", json=b, headers=ADMIN)
                    )
        assert (await _settled(redis, "v", to_a, to_b))["v"]["name"][0] in "ab"


async def test_a_redis_that_lost_its_data_is_seeded_again(
    redis: RedisServer, tmp_path: Path
) -> None:
    async with _two(redis, "--meta-file", str(tmp_path / "meta.jsonl")) as (to_a, to_b):
        redis.stop()  # no persistence: it comes back empty
        redis.start()
        with trio.fail_after(20):
            while b"van-12" not in await _hash(redis):
                await trio.sleep(0.1)
        await _until(to_a, "van-12", {"van-12": VAN})
        await _until(to_b, "van-12", {"van-12": VAN})
        assert (await to_b.put("/meta/van-40", json={"name": "40"}, headers=ADMIN)).is_success
        await _until(to_a, "van-40", {"van-40": {"name": "40"}})


async def test_a_change_redis_does_not_answer_is_refused_and_a_retry_settles_it(
    redis: RedisServer,
) -> None:
    async with _two(redis, "--bus-timeout-s", "1") as (to_a, to_b):
        redis.freeze()
        try:
            started = trio.current_time()
            refused = await to_a.put("/meta/van-12", json={"name": "new"}, headers=ADMIN)
            assert trio.current_time() - started < 5
            assert refused.status_code == 503
            assert refused.json()["error"] == "meta_unavailable"
            assert "Retry-After" in refused.headers
            assert await _read(to_a, "van-12") == {"van-12": VAN}  # not yet, here either
        finally:
            redis.thaw()
        # Made or not (a frozen Redis runs what was sent to it when it wakes): every
        # instance has what Redis holds.
        assert await _settled(redis, "van-12", to_a, to_b) in (
            {"van-12": {"name": "new"}},
            {"van-12": VAN},
        )
        assert (await to_b.put("/meta/van-12", json=VAN, headers=ADMIN)).status_code == 200
        await _until(to_a, "van-12", {"van-12": VAN})
        assert json.loads((await _hash(redis))[b"van-12"]) == VAN


async def test_what_is_not_metadata_in_redis_is_skipped(redis: RedisServer) -> None:
    async with coredis.Redis.from_url(redis.url, stream_timeout=5, connect_timeout=5) as client:
        await client.hset(
            "trk:meta",
            {
                "bad-json": b"{not json",
                "too-long": b'{"name": "' + b"x" * 500 + b'"}',
                b"\xff\xfe": b'{"name": "bad id"}',
                "nested": b'{"properties": {"a": {"b": [1, 2]}}}',
                "fine": b'{"name": "ok"}',
            },
        )
        async with (
            tracker_instances(redis, 1, "--token-secrets", SECRET) as (a,),
            httpx.AsyncClient(base_url=a.url, timeout=10) as to_a,
        ):
            await _until(to_a, "fine", {"fine": {"name": "ok"}})
            assert await _read(to_a, "bad-json,too-long,nested") == {}
            for junk in (b"", b"\x93\x01\x02", b"\xc1", b"\x92\xa1n\x92\xa1v\x81\xa4name" * 50):
                await client.publish("trk:meta", junk)
            assert (await to_a.put("/meta/after", json={"name": "a"}, headers=ADMIN)).is_success
            assert await _read(to_a, "after,fine") == {
                "after": {"name": "a"},
                "fine": {"name": "ok"},
            }
