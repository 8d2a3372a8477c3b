"""The issue's zone benchmark over HTTP, against ``tracker serve`` processes.

    python -m bench.zones http --runs 3          # 10,000 zones, 50,000 vehicles at 1 Hz

Each run starts two trackers (``tracker serve``, default tick 0.1 s, each in its own
scratch directory so each has its own database): "on", given ``--zones`` zones of mixed
sizes over a 220 x 200 km region (``bench.zones.zone_features``) through ``POST /zones``
(plus one probe zone away from them), and "off", with none. The fleet is
``bench.zones.Fleet`` (``--vehicles`` driving at 5-30 m/s over the same region), sent as
``bench.ingest``'s prebuilt msgpack batches of 5,000. Then, in order:

1. **ingest** (closed loop, ``bench.ingest.post_rounds``: 4 connections posting rounds back
   to back): off, on, off, on for ``--ingest-seconds`` each; accepted pings per second
   (median of one-second samples) with zones on and off, in the same run.
2. **latency** at the issue's load (on): a round of every vehicle each second (50,000
   pings/s) for ``--latency-seconds``, a webhook subscribed to every event, and probe
   vehicles (``--probes``, in 20 batches a second, each stamped when sent) alternating
   between the probe zone and 2 km outside it: every probe ping raises an event, read on
   ``GET /alerts?zones=probe``; latency = arrival minus the ping's ``ts``. Each round is
   posted at once (a burst of 50,000 pings at the start of each second), or with
   ``--spread`` batch by batch evenly over its second. The first
   ``--warmup`` seconds (the first round's ~30,000 enters) are not counted. Also: events
   per second (all zones), the tracker's CPU, the engine's lag and the longest tick.
3. **webhooks**: ``--vehicles`` new vehicles ping once from inside the probe zone (as many
   ``enter`` events in one tick) for a webhook subscribed to the probe zone alone:
   deliveries per second to the local receiver over ``--webhook-seconds``.
4. **restart**: the "on" tracker stopped and started again on its database; seconds until
   it serves (its zones read back and compiled).

``tracker serve`` runs Hypercorn's Trio worker in its own process, so its pid is the event
loop's; the zone engine runs in a process below it (unless ``--zone-engine-thread``): CPU
figures count the tracker's process and every process below it (``*_cpu_cores``, what
the per-CPU-second rates divide by) and the loop's process alone
(``*_loop_process_cpu_cores``). Prints each run's figures and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import msgspec
import numpy as np
import trio

from bench.alerts import Receiver, send_alternating
from bench.common import INGEST_HEADERS, UNLIMITED, cpu_seconds
from bench.fleet import metric
from bench.ingest import BodyMaker, Counts, post_all, post_rounds
from bench.zones import Fleet, zone_features
from tracker.auth import Keyring

Figures = dict[str, Any]
SECRET = "bench-zones-http-secret-0123456789abcdef"
PROBE = (53.9, 13.405)
"""The probe zone's centre: north of the fleet's region (it spans 51.5-53.5 N)."""
PROBE_ZONE = {
    "type": "Feature",
    "id": "probe",
    "geometry": {"type": "Point", "coordinates": [PROBE[1], PROBE[0]]},
    "properties": {"name": "probe", "kind": "probe", "radius_m": 500},
}


class ZoneBodies(BodyMaker):
    """``bench.ingest``'s bodies, the vehicles driving as ``bench.zones.Fleet`` drives."""

    def __init__(self, vehicles: int, batch: int) -> None:
        super().__init__(vehicles, batch)
        self.fleet = Fleet(vehicles, np.random.default_rng(1))

    def round(self) -> list[bytes]:
        self.fleet.step()
        self.pings["lat"] = self.fleet.lat
        self.pings["lon"] = self.fleet.lon
        return super().round()


def burst_bodies(vehicles: int) -> list[bytes]:
    """One ping of each of ``vehicles`` new vehicles, all in the probe zone."""
    maker = BodyMaker(vehicles, 5000)
    maker.pings["id"] = [f"b{n:07d}".encode() for n in range(vehicles)]
    maker.pings["lat"], maker.pings["lon"] = PROBE
    return maker.round()


def _log_file(directory: str) -> int:
    """Where a tracker's log goes: ``$BENCH_TRACKER_LOGS/<n>.log`` if that is set (the
    loop watch names the steps that held the loop), else nowhere."""
    where = os.environ.get("BENCH_TRACKER_LOGS")
    if not where:
        return subprocess.DEVNULL
    os.makedirs(where, exist_ok=True)
    name = os.path.join(where, f"{os.path.basename(directory)}-{time.time():.0f}.log")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


async def start(nursery: trio.Nursery, directory: str, *options: str) -> tuple[trio.Process, str]:
    """``tracker serve`` in ``directory`` (its database there); its process and URL once
    ``/readyz`` says it is ready (its zones read back: that may take a while)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tracker", "serve", *UNLIMITED, "--port", str(port)]
    run = functools.partial(
        trio.run_process,
        [*command, *options],
        stdout=subprocess.DEVNULL,
        stderr=_log_file(directory),
        check=False,
        cwd=directory,
    )
    process: trio.Process = await nursery.start(run)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        with trio.fail_after(300):
            while True:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return process, url
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the zone engine's process, under its forkserver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid`` itself, and of ``pid`` with every process below it."""
    own = cpu_seconds(pid)
    rest = 0.0
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            rest += cpu_seconds(child)
    return own, own + rest


def admin_headers(content_type: str = "application/geo+json") -> dict[str, str]:
    token = Keyring([SECRET], resolution=7, max_cells=4000).mint(ttl_s=3600, admin=True)
    return {"Authorization": f"Bearer {token}", "Content-Type": content_type}


async def load_zones(http: httpx.AsyncClient, features: list[dict[str, Any]]) -> float:
    """POST the zones 1,000 a request; seconds until the tracker holds them all."""
    started = time.perf_counter()
    for first in range(0, len(features), 1000):
        document = {"type": "FeatureCollection", "features": features[first : first + 1000]}
        reply = await http.post(
            "/zones", content=msgspec.json.encode(document), headers=admin_headers()
        )
        assert reply.status_code == 201, reply.text[:300]
    return time.perf_counter() - started


async def flat_out(url: str, maker: ZoneBodies, seconds: float, pid: int) -> Figures:
    """Closed-loop ingest for ``seconds`` (after 2 s of warm-up): pings/s, CPU."""
    counts = Counts()
    async with trio.open_nursery() as nursery:
        start_at = trio.current_time()
        nursery.start_soon(post_rounds, url, maker, 4, start_at + 2 + seconds, counts)
        await trio.sleep(2)
        (own, cpu), client, samples = tree_cpu_seconds(pid), time.process_time(), []
        for _ in range(int(seconds)):
            before = counts.accepted
            await trio.sleep(1.0)
            samples.append(counts.accepted - before)
        own_after, cpu_after = tree_cpu_seconds(pid)
        client = time.process_time() - client
    return {
        "accepted_per_s": statistics.median(samples),
        "refused": counts.refused,
        "cpu_cores": (cpu_after - cpu) / int(seconds),
        "loop_process_cpu_cores": (own_after - own) / int(seconds),
        "client_cpu_cores": client / int(seconds),
    }


async def read_events(
    http: httpx.AsyncClient, path: str, into: list[tuple[float, float]], ready: trio.Event
) -> None:
    """Each event of an ``/alerts`` stream as (arrival, latency) into ``into``."""
    async with http.stream("GET", path) as response:
        ready.set()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                now = time.time()
                into.append((now, now - json.loads(line[6:])["t"]))


async def paced(
    url: str, maker: ZoneBodies, rounds: int, counts: Counts, *, spread: bool = False
) -> None:
    """A round every second (a late round starts at once), ``rounds`` of them: posted at
    once on 4 connections (a burst at the start of each second), or with ``spread`` its
    batches one by one evenly over the second (devices whose seconds are not in step)."""
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        next_at = trio.current_time()
        for _ in range(rounds):
            bodies = maker.round()
            async with trio.open_nursery() as nursery:
                if spread:
                    for number, body in enumerate(bodies):
                        await trio.sleep_until(next_at + number / len(bodies))
                        nursery.start_soon(post_all, client, [body], counts)
                else:
                    for number in range(4):
                        nursery.start_soon(post_all, client, bodies[number::4], counts)
            next_at = max(next_at + 1.0, trio.current_time() - 1.0)
            await trio.sleep_until(next_at)


def percentiles(name: str, values: list[float]) -> Figures:
    if not values:
        return {f"{name}_count": 0}
    ms = np.array(values) * 1000
    return {
        f"{name}_count": len(values),
        f"{name}_p50_ms": round(float(np.percentile(ms, 50)), 1),
        f"{name}_p99_ms": round(float(np.percentile(ms, 99)), 1),
        f"{name}_max_ms": round(float(ms.max()), 1),
    }


async def latency(args: argparse.Namespace, url: str, maker: ZoneBodies, pid: int) -> Figures:
    """Phase 2 (module doc): the issue's load, probes, every event, a webhook."""
    receiver = Receiver()
    probe: list[tuple[float, float]] = []
    lags: list[float] = []
    counts = Counts()
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        port = await receiver.listen(nursery)
        hook = {"url": f"http://127.0.0.1:{port}/hook", "zones": [], "kinds": []}
        made = await http.post("/webhooks", json=hook, headers=admin_headers("application/json"))
        assert made.status_code == 201, made.text
        ready = trio.Event()
        nursery.start_soon(read_events, http, "/alerts?zones=probe", probe, ready)
        await ready.wait()

        async def watch_lag() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as watcher:
                while True:
                    lags.append(await metric(watcher, "tracker_zone_engine_lag_seconds"))
                    await trio.sleep(0.5)

        nursery.start_soon(watch_lag)
        events_before = await metric(http, "tracker_zone_events_total")
        began = time.time()
        own, cpu = tree_cpu_seconds(pid)
        seconds = args.warmup + args.latency_seconds
        async with trio.open_nursery() as load:
            load.start_soon(
                functools.partial(paced, spread=args.spread), url, maker, int(seconds), counts
            )
            probes = functools.partial(
                send_alternating, centre=PROBE, prefix="probe", headers=INGEST_HEADERS
            )
            load.start_soon(probes, http, args.probes, seconds)
        own_after, cpu_after = tree_cpu_seconds(pid)
        took = time.time() - began
        await trio.sleep(1.0)  # the last ticks, commits and streams
        events = await metric(http, "tracker_zone_events_total") - events_before
        longest_tick = await metric(http, "tracker_tick_duration_max_seconds")
        dropped = await metric(http, "tracker_zone_pings_dropped")
        merged = await metric(http, "tracker_zone_ticks_merged")
        engine_call = await metric(http, "tracker_zone_tick_seconds")
        engine_call_max = await metric(http, "tracker_zone_engine_call_max_seconds")
        commits = await commit_figures(http)
        nursery.cancel_scope.cancel()
    counted_from = began + args.warmup
    return {
        "load_pings_per_s": round(counts.accepted / took),
        "probe_late_seconds": sorted({round(at - began) for at, lat in probe if lat > 0.5}),
        "latency_began_at": time.strftime("%H:%M:%S", time.localtime(began)),
        **percentiles("probe_latency", [lat for at, lat in probe if at >= counted_from]),
        "events_per_s": round(events / took),
        "webhook_deliveries_per_s_during_load": round(len(receiver.times) / took),
        "tracker_cpu_cores": round((cpu_after - cpu) / took, 2),
        "tracker_loop_process_cpu_cores": round((own_after - own) / took, 2),
        "engine_lag_max_s": round(max(lags, default=0.0), 3),
        "engine_last_call_ms": round(1000 * engine_call, 1),
        "engine_longest_call_ms": round(1000 * engine_call_max, 1),
        "engine_ticks_merged": int(merged),
        "engine_pings_dropped": int(dropped),
        "longest_tick_ms": round(1000 * longest_tick, 1),
        **commits,
    }


async def commit_figures(http: httpx.AsyncClient) -> Figures:
    """The alert log's commits since start: how many, their mean, how many over 0.25 s."""
    text = (await http.get("/metrics")).text
    count = await metric(http, "tracker_alert_commit_seconds_count")
    total = await metric(http, "tracker_alert_commit_seconds_sum")
    quick = re.search(r'^tracker_alert_commit_seconds_bucket\{le="0.25"\} (\S+)$', text, re.M)
    return {
        "alert_commits": int(count),
        "alert_commit_mean_ms": round(1000 * total / max(count, 1), 1),
        "alert_commits_over_250ms": int(count - float(quick.group(1))) if quick else None,
    }


async def webhook_burst(args: argparse.Namespace, url: str) -> Figures:
    """Phase 3: ``--vehicles`` new vehicles enter the probe zone at once; deliveries/s."""
    receiver = Receiver()
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        port = await receiver.listen(nursery)
        hook = {"url": f"http://127.0.0.1:{port}/hook", "zones": ["probe"], "kinds": []}
        made = await http.post("/webhooks", json=hook, headers=admin_headers("application/json"))
        assert made.status_code == 201, made.text
        counts = Counts()
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            bodies = burst_bodies(args.vehicles)
            async with trio.open_nursery() as posting:
                for number in range(4):
                    posting.start_soon(post_all, client, bodies[number::4], counts)
        await trio.sleep(args.webhook_seconds)
        nursery.cancel_scope.cancel()
    times = receiver.times
    if len(times) < 2:
        return {"webhook_burst_events": counts.accepted, "webhook_deliveries_per_s": 0}
    return {
        "webhook_burst_events": counts.accepted,
        "webhook_delivered": len(times),
        "webhook_deliveries_per_s": round((len(times) - 1) / (times[-1] - times[0])),
    }


async def one_run(args: argparse.Namespace) -> Figures:
    figures: Figures = {"load_average": os.getloadavg()[0], "spread": args.spread}
    features = zone_features(args.zones, random.Random(1))
    with tempfile.TemporaryDirectory() as on_dir, tempfile.TemporaryDirectory() as off_dir:
        options = ("--token-secrets", SECRET, "--webhook-allow", "127.0.0.1/32")
        async with trio.open_nursery() as nursery:
            on, on_url = await start(nursery, on_dir, *options)
            off, off_url = await start(nursery, off_dir, *options)
            async with httpx.AsyncClient(base_url=on_url, timeout=120) as http:
                figures["zones_post_s"] = round(await load_zones(http, features), 1)
                await load_zones(http, [PROBE_ZONE])
                with trio.fail_after(120):
                    while await metric(http, "tracker_zones") < args.zones + 1:
                        await trio.sleep(0.2)
            maker = ZoneBodies(args.vehicles, 5000)
            phases: dict[str, list[Figures]] = {"off": [], "on": []}
            for _ in range(2):
                for label, where, process in (("off", off_url, off), ("on", on_url, on)):
                    measured = await flat_out(where, maker, args.ingest_seconds, process.pid)
                    phases[label].append(measured)
            off.kill()
            for label, measured in phases.items():
                rate = statistics.median(m["accepted_per_s"] for m in measured)
                cores = statistics.median(m["cpu_cores"] for m in measured)
                loop_cores = statistics.median(m["loop_process_cpu_cores"] for m in measured)
                figures[f"ingest_zones_{label}_loop_process_cpu_cores"] = round(loop_cores, 2)
                client = statistics.median(m["client_cpu_cores"] for m in measured)
                figures[f"ingest_zones_{label}_client_cpu_cores"] = round(client, 2)
                figures[f"ingest_zones_{label}_per_s"] = rate
                figures[f"ingest_zones_{label}_cpu_cores"] = round(cores, 2)
                figures[f"ingest_zones_{label}_per_cpu_s"] = round(rate / max(cores, 0.01))
            on_rate, off_rate = figures["ingest_zones_on_per_s"], figures["ingest_zones_off_per_s"]
            figures["ingest_on_off_ratio"] = round(on_rate / off_rate, 3)
            await trio.sleep(3)  # the engine's backlog of the flat-out phase
            figures.update(await latency(args, on_url, maker, on.pid))
            figures.update(await webhook_burst(args, on_url))
            on.terminate()
            await on.wait()
            started = time.perf_counter()
            again, _ = await start(nursery, on_dir, *options)
            figures["restart_with_zones_s"] = round(time.perf_counter() - started, 1)
            again.terminate()
            nursery.cancel_scope.cancel()
    return figures


def median_of(runs: list[Figures]) -> Figures:
    """Each numeric figure's median over the runs."""
    medians: Figures = {}
    for name in runs[0]:
        values = [run.get(name) for run in runs]
        if all(isinstance(v, int | float) for v in values):
            medians[name] = statistics.median(values)  # type: ignore[type-var]
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.zones http", description=__doc__)
    parser.add_argument("--zones", type=int, default=10_000)
    parser.add_argument("--vehicles", type=int, default=50_000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--ingest-seconds", type=float, default=8.0)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--webhook-seconds", type=float, default=10.0)
    parser.add_argument(
        "--spread",
        action="store_true",
        help="latency phase: each second's batches posted evenly over it, not at once",
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures there")
    args = parser.parse_args(argv)
    print(f"machine: {platform.platform()}, python {platform.python_version()}")
    runs: list[Figures] = []
    for number in range(args.runs):
        figures = trio.run(one_run, args)
        runs.append(figures)
        print(f"run {number + 1}: {json.dumps(figures)}", flush=True)
    for name, value in median_of(runs).items():
        print(f"{name:<40} {value}  {[run[name] for run in runs]}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(runs, out, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
