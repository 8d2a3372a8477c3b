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
import platform
import sys
from collections.abc import Callable
from typing import Any

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


if __name__ == "__main__":
    sys.exit(main())
