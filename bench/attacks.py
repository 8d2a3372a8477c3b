"""Attacks from issue 13, measured: how long one request holds the tracker, and its memory.

    python -m bench.attacks area      # 60 thin-strip bbox= terms in one ~1 KB feed query
    python -m bench.attacks ingest    # 8 MiB of garbage array items posted to /ingest

Each runs a ``tracker serve`` child process (``bench.common.start_tracker``), probes
``/healthz`` every 20 ms while the attack runs, and prints: how long the attack request
took, the slowest ``/healthz`` answer during it (how long the event loop was held), and
the tracker's peak resident memory (``VmHWM``) before and after. ``area`` first times
``parse_area`` in this process on each adversarial query, then sends the 60 strips, then
8 feeds at once each asking for 16 tall strips (the costliest area still accepted).
``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

from bench.common import INGEST_HEADERS, start_tracker
from tracker.errors import TrackerError
from tracker.regions import parse_area

PROBE_INTERVAL_S = 0.02
CONCURRENT = 8
STRIPS = 60
"""Thin strips along the equator in one query (each ~10k cells, estimated at ~0 by area)."""


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a process (``VmHWM``), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def area_queries() -> dict[str, list[tuple[str, str]]]:
    """The adversarial feed queries, by name."""
    strips = [("bbox", f"-89,0,89,{1 + i / 100:.2f}e-5") for i in range(STRIPS)]
    return {
        "thin strip": [("bbox", "-89,0,89,1e-5")],
        "tall strip": [("bbox", "0,-89,1e-5,89")],
        f"{STRIPS} thin strips": strips,
        "world minus a sliver": [("bbox", "-179.99,-1e-5,179.99,0")],
    }


def time_parse_area() -> dict[str, float]:
    """Milliseconds ``parse_area`` takes on each adversarial query, in this process."""
    timings = {}
    for name, query in area_queries().items():
        params: dict[str, list[str]] = {}
        for key, value in query:
            params.setdefault(key, []).append(value)
        started = time.perf_counter()
        with contextlib.suppress(TrackerError):
            parse_area(params, resolution=7, max_cells=4000)
        timings[name] = round((time.perf_counter() - started) * 1000, 1)
    return timings


async def probe_health(url: str, done: trio.Event, worst: list[float]) -> None:
    """GET /healthz every few ms until ``done``; keep the slowest answer's seconds."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while not done.is_set():
            started = time.perf_counter()
            await http.get("/healthz")
            worst[0] = max(worst[0], time.perf_counter() - started)
            await trio.sleep(PROBE_INTERVAL_S)


async def under_probe(
    url: str, pid: int, attack: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
) -> dict[str, Any]:
    """Run ``attack`` while probing /healthz; its time, status and what it did to the server."""
    rss_before = peak_rss_mib(pid)
    worst = [0.0]
    done = trio.Event()
    async with trio.open_nursery() as probe_nursery:
        probe_nursery.start_soon(probe_health, url, done, worst)
        await trio.sleep(0.2)
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            started = time.perf_counter()
            response = await attack(http)
            elapsed = time.perf_counter() - started
        await trio.sleep(0.2)
        done.set()
    return {
        "status": response.status_code,
        "request_s": round(elapsed, 3),
        "worst_healthz_ms": round(worst[0] * 1000, 1),
        "peak_rss_mib_before": round(rss_before, 1),
        "peak_rss_mib_after": round(peak_rss_mib(pid), 1),
    }


async def area_attack() -> dict[str, Any]:
    results: dict[str, Any] = {"parse_area_ms": time_parse_area()}
    async with trio.open_nursery() as bench_nursery:
        process, url = await start_tracker(bench_nursery)
        query = area_queries()[f"{STRIPS} thin strips"]
        results["query_bytes"] = len(str(httpx.QueryParams(query)))

        async def attack(http: httpx.AsyncClient) -> httpx.Response:
            return await http.get("/feed", params=query)

        results["http"] = await under_probe(url, process.pid, attack)
        heavy = [("bbox", f"{lon},0,{lon + 1e-5},2.4") for lon in range(16)]

        async def accepted(http: httpx.AsyncClient) -> httpx.Response:
            """CONCURRENT feeds at once, each asking for the costliest area still accepted."""
            responses: list[httpx.Response] = []

            async def one() -> None:
                async with http.stream("GET", "/feed", params=heavy) as response:
                    responses.append(response)

            async with trio.open_nursery() as attackers:
                for _ in range(CONCURRENT):
                    attackers.start_soon(one)
            return responses[-1]

        results["http_accepted_x8"] = await under_probe(url, process.pid, accepted)
        bench_nursery.cancel_scope.cancel()
    return results


def garbage_bodies(size: int) -> dict[str, tuple[bytes, str]]:
    """``size``-byte arrays of garbage: msgpack 1-byte integers, JSON ``[1,1,...]``, and
    JSON ``[[1,1],...]`` (which the JSON byte scan cannot count: the worst case left)."""
    count = size - 5  # the array32 header
    msgpack = b"\xdd" + count.to_bytes(4, "big") + b"\x01" * count
    json_count = size // 2
    return {
        "msgpack": (msgpack, "application/msgpack"),
        "json": (b"[" + b"1," * (json_count - 1) + b"1]", "application/json"),
        "json pairs": (b"[" + b"[1,1]," * (size // 6 - 1) + b"[1]]", "application/json"),
    }


async def post_body(http: httpx.AsyncClient, *, body: bytes, media: str) -> httpx.Response:
    """POST ``body`` to /ingest as ``media``, with the benchmark's ingest key."""
    headers = {**INGEST_HEADERS, "Content-Type": media}
    return await http.post("/ingest", content=body, headers=headers)


async def ingest_attack(size: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (body, media) in garbage_bodies(size).items():
        async with trio.open_nursery() as bench_nursery:
            process, url = await start_tracker(bench_nursery)

            attack = functools.partial(post_body, body=body, media=media)
            results[name] = await under_probe(url, process.pid, attack)
            results[name]["body_bytes"] = len(body)
            bench_nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", choices=["area", "ingest"])
    parser.add_argument("--size", type=int, default=8 * 1024 * 1024 - 64, help="ingest body bytes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    attacks = {"area": area_attack, "ingest": functools.partial(ingest_attack, args.size)}
    results = trio.run(attacks[args.attack])
    print(json.dumps(results) if args.json else json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
