"""Fan-out against the number of subscribers, tracker and naive baseline, with a plot.

    python -m bench.sweep --vehicles 20000 --subscribers 100,250,500,1000 --out bench-results
    python -m bench.sweep --vehicles 5000 --subscribers 500,2000 --tick 0.1 --viewport-km 2,3 \
        --paths direct,framework --no-baseline --rounds 3     # issue 19: old and new path

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


def run_fleet(
    out: str,
    vehicles: int,
    subscribers: int,
    seconds: float,
    baseline: bool,
    options: tuple[str, ...] = (),
    name: str = "",
) -> Any:
    """One bench.fleet run in its own process (``options`` passed on); its figures."""
    name = name or f"{'baseline' if baseline else 'tracker'}-{subscribers}"
    path = os.path.join(out, f"{name}.json")
    command = [sys.executable, "-m", "bench.fleet", "--vehicles", str(vehicles)]
    command += ["--subscribers", str(subscribers), "--seconds", str(seconds), "--json", path]
    command += list(options)
    subprocess.run(command + (["--baseline"] if baseline else []), check=True)
    with open(path) as figures:
        return json.load(figures)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Delivered rate and latency against subscribers, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = sorted({_label(r) for r in runs})
    for server in labels:
        style = "--s" if server == "baseline" else "-o"
        mine = sorted((r for r in runs if _label(r) == server), key=lambda r: r["subscribers"])
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


def _label(run: dict[str, Any]) -> str:
    """baseline, or the tracker and its feed path."""
    return "baseline" if run["server"] == "baseline" else f"tracker {run.get('path', 'direct')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=20_000)
    parser.add_argument("--subscribers", default="100,250,500,1000")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--tick", default="1.0", help="the tracker's tick (bench.fleet --tick)")
    parser.add_argument("--viewport-km", default="0.5,5")
    parser.add_argument("--clients", default="2", help="load client processes per run")
    parser.add_argument("--verify-every", default="1")
    parser.add_argument(
        "--paths",
        default="direct",
        help="feed paths to run, alternating: direct (tracker.direct), framework (Quart)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each, alternated")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    common = ("--tick", args.tick, "--viewport-km", args.viewport_km, "--clients", args.clients)
    common += ("--verify-every", args.verify_every)
    runs = []
    for subscribers in [int(n) for n in args.subscribers.split(",")]:
        for round_ in range(args.rounds):
            for path in args.paths.split(","):
                options = common + (("--framework-feeds",) if path == "framework" else ())
                name = f"tracker-{path}-{subscribers}-{round_}"
                runs.append(
                    run_fleet(
                        args.out, args.vehicles, subscribers, args.seconds, False, options, name
                    )
                )
            if not args.no_baseline:
                runs.append(run_fleet(args.out, args.vehicles, subscribers, args.seconds, True))
    with open(os.path.join(args.out, "sweep.json"), "w") as out:
        json.dump(runs, out, indent=2)
    plot(runs, os.path.join(args.out, "fanout.png"))
    print(f"wrote {args.out}/sweep.json and {args.out}/fanout.png")


if __name__ == "__main__":
    main()
