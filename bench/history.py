"""History benchmarks (issue 15): one section per part, each printing its figures.

    python -m bench.history store     # the stores alone: append, compact, bytes, queries
    python -m bench.history ingest    # /ingest with history on (embedded, PostgreSQL) vs off
    python -m bench.history query     # track and area queries over HTTP under ingest load

Each section is a subcommand registered in :func:`main` by one ``add_<section>`` function
that adds its parser and sets ``run`` to a function from the parsed arguments to a dict
of figures; :func:`main` prints them as a table, and with ``--json FILE`` writes them.
Figures, machine and commands go to ``docs/performance.md`` and ``docs/history.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import trio

from bench import ingest as bench_ingest
from tracker.history.store import open_store

Figures = dict[str, Any]
Run = Callable[[argparse.Namespace], Figures]
Sections = Any
"""argparse's subparsers action (its class is private)."""


def report(figures: Figures, json_path: str | None) -> None:
    """Print ``figures`` one per line; with ``json_path``, also write them there as JSON."""
    width = max((len(name) for name in figures), default=0)
    for name, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"machine": platform.platform(), **figures}, out, indent=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    sections: Sections = parser.add_subparsers(dest="section", required=True)
    for add in SECTIONS:
        add(sections)
    args = parser.parse_args(argv)
    report(args.run(args), args.json)


SECTIONS: list[Callable[[Sections], None]] = []
"""Each section's ``add_<section>(sections)``, in the order ``--help`` lists them."""


def add_ingest(sections: Sections) -> None:
    """``ingest``: pings/s through ``POST /ingest`` with history off, embedded, PostgreSQL.

    The load and the figures are :mod:`bench.ingest`'s (a tracker process, keep-alive
    connections posting prebuilt msgpack batches back to back); with history on it adds
    how fast history committed over the same seconds and what was still queued at the
    end: history keeps up when it commits what ingest accepts, with nothing refused.
    """
    parser = sections.add_parser(
        "ingest", help="ingest with history off, embedded and (optionally) PostgreSQL"
    )
    bench_ingest.add_arguments(parser)
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default="",
        help="also measure --history URL (a database of yours: the benchmark writes to it)",
    )
    parser.add_argument(
        "--stores", default="off,sqlite", help="which of off, sqlite (and postgres) to run"
    )
    parser.set_defaults(run=run_ingest)


def run_ingest(args: argparse.Namespace) -> Figures:
    figures: Figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-history-") as scratch:
        path = os.path.join(scratch, "history.sqlite3")
        targets = {"off": "off", "sqlite": path, "postgres": args.postgres}
        chosen = args.stores.split(",") + (["postgres"] if args.postgres else [])
        for label in dict.fromkeys(chosen):
            measured = trio.run(bench_ingest.measure, args, "--history", targets[label])
            for name, value in measured.items():
                if label != "off" or not name.startswith("history_"):
                    figures[f"{label}_{name}"] = value
            if label == "sqlite":
                store = open_store(path)
                store.migrate()
                stats = store.stats()
                store.close()
                figures["sqlite_positions_stored"] = stats.positions
                figures["sqlite_bytes_per_position_raw"] = round(
                    stats.bytes_on_disk / max(1, stats.positions), 2
                )
    return figures


SECTIONS.append(add_ingest)


if __name__ == "__main__":
    sys.exit(main())
