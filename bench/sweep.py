"""Fan-out against the number of subscribers, tracker and naive baseline, with a plot.

    python -m bench.sweep --vehicles 20000 --subscribers 100,250,500,1000 --out bench-results

Runs :mod:`bench.fleet` once per subscriber count for the tracker and once for the naive
JSON-per-ping baseline (``--no-baseline`` skips it), writes every run's figures to
``OUT/sweep.json`` and plots delivered positions per second and p50/p99 latency against
subscribers to ``OUT/fanout.png`` (matplotlib, from the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any


def run_fleet(out: str, vehicles: int, subscribers: int, seconds: float, baseline: bool) -> Any:
    """One bench.fleet run in its own process; its figures."""
    name = f"{'baseline' if baseline else 'tracker'}-{subscribers}.json"
    path = os.path.join(out, name)
    command = [sys.executable, "-m", "bench.fleet", "--vehicles", str(vehicles)]
    command += ["--subscribers", str(subscribers), "--seconds", str(seconds), "--json", path]
    subprocess.run(command + (["--baseline"] if baseline else []), check=True)
    with open(path) as figures:
        return json.load(figures)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Delivered rate and latency against subscribers, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, style in (("tracker", "-o"), ("baseline", "--s")):
        mine = sorted((r for r in runs if r["server"] == server), key=lambda r: r["subscribers"])
        if not mine:
            continue
        subscribers = [r["subscribers"] for r in mine]
        rate.plot(subscribers, [r["positions_per_s"] for r in mine], style, label=server)
        latency.plot(subscribers, [r["latency_p50_ms"] for r in mine], style, label=f"{server} p50")
        latency.plot(subscribers, [r["latency_p99_ms"] for r in mine], style, label=f"{server} p99")
    rate.set(xlabel="subscribers", ylabel="positions delivered per second", yscale="log")
    latency.set(xlabel="subscribers", ylabel="ping to client latency (ms)", yscale="log")
    for axes in (rate, latency):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    vehicles = runs[0]["vehicles"]
    figure.suptitle(f"{vehicles:,} vehicles at 1 Hz, random city viewports, one tracker process")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=20_000)
    parser.add_argument("--subscribers", default="100,250,500,1000")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for subscribers in [int(n) for n in args.subscribers.split(",")]:
        for baseline in (False,) if args.no_baseline else (False, True):
            runs.append(run_fleet(args.out, args.vehicles, subscribers, args.seconds, baseline))
    with open(os.path.join(args.out, "sweep.json"), "w") as out:
        json.dump(runs, out, indent=2)
    plot(runs, os.path.join(args.out, "fanout.png"))
    print(f"wrote {args.out}/sweep.json and {args.out}/fanout.png")


if __name__ == "__main__":
    main()
