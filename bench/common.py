"""What every benchmark needs: a tracker in its own process, its CPU and memory, viewports.

Benchmarks run the tracker as a separate process (``tracker serve``), as in production,
so the load they generate never shares its interpreter, and its CPU time and memory can
be read from ``/proc`` alone.
"""

from __future__ import annotations

import functools
import math
import os
import random
import subprocess
import sys
from typing import Any

import trio

from tracker.config import TrackerConfig

CITY = (52.52, 13.405)
"""Centre of the simulator's default city (Berlin), which benchmarks watch."""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


INGEST_KEY = "bench-ingest-key"
INGEST_HEADERS = {"Content-Type": "application/msgpack", "X-Ingest-Key": INGEST_KEY}
UNLIMITED = ["--open", "--ingest-keys", INGEST_KEY]
UNLIMITED += ["--ingest-rate-per-key", "0", "--max-streams-per-address", "0"]
UNLIMITED += ["--history", "off"]
"""Options of benchmarked trackers: feeds open, a known ingest key, and no limits, which
are there to stop abuse and would otherwise cap what a benchmark measures; no history
unless a benchmark passes ``--history`` (a later option wins)."""


def unlimited_config(**overrides: Any) -> TrackerConfig:
    """The in-process twin of :data:`UNLIMITED`: a tracker served by this process on a
    free loopback port, feeds open, the known ingest key, no limits and no history;
    ``overrides`` set any other field (the tick, replay log size, token secrets...)."""
    unlimited: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "open_feeds": True,
        "ingest_keys": INGEST_KEY,
        "ingest_rate_per_key": 0,
        "max_streams_per_address": 0,
        "history": "",
    }
    return TrackerConfig(**(unlimited | overrides))


async def start_tracker(
    nursery: trio.Nursery,
    *options: str,
    baseline: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[trio.Process, str]:
    """``tracker serve --port 0 *options`` in a child process; its URL once it listens.

    With ``baseline``, the naive server of :mod:`bench.baseline` instead. ``env`` adds
    environment variables (``TRACKER_*`` options that have no flag to turn them off).
    The process belongs to ``nursery``: cancelling the nursery stops it.
    """
    server = ["bench.baseline"] if baseline else ["tracker", "serve", *UNLIMITED]
    command = [sys.executable, "-m", *server, "--port", "0", *options]
    run = functools.partial(
        trio.run_process,
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=False,
        env={**os.environ, **(env or {})},
    )
    process: trio.Process = await nursery.start(run)
    return process, await serving_url(process)


async def serving_url(
    process: trio.Process, *, scheme: str = "http", timeout_s: float = 20.0
) -> str:
    """The first ``scheme`` URL a starting tracker prints, once it says it serves."""
    assert process.stdout is not None
    output = b""
    with trio.fail_after(timeout_s):
        while b"Ctrl-C" not in output:
            output += await process.stdout.receive_some()
    return next(word for word in output.decode().split() if word.startswith(f"{scheme}://"))


def viewport(rng: random.Random, smallest_km: float = 2.0, largest_km: float = 12.0) -> str:
    """A random city viewport (a ``bbox=`` query), its height uniform in the size range.

    Heights are drawn on a log scale, so small (street-level) views are as common as city
    overviews; the width is 1.6 times the height, as on a landscape screen.
    """
    height_km = math.exp(rng.uniform(math.log(smallest_km), math.log(largest_km)))
    half = height_km / 2 / 111.2
    lat = CITY[0] + rng.uniform(-0.05, 0.05)
    lon = CITY[1] + rng.uniform(-0.08, 0.08)
    half_lon = half * 1.6 / math.cos(math.radians(lat))
    return f"bbox={lon - half_lon:.4f},{lat - half:.4f},{lon + half_lon:.4f},{lat + half:.4f}"
