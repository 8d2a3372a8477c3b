"""The ``tracker`` command: ``tracker serve`` and friends.

Every ``serve`` option is generated from a :class:`~tracker.config.TrackerConfig` field,
so the flags, their help, the ``TRACKER_*`` environment variables and the validation
are one list. Precedence: flag, then environment, then default. This module is the only
place that reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, get_args, get_type_hints

import msgspec
import trio

from tracker.config import ConfigError, TrackerConfig, load_config
from tracker.server import serve

__all__ = ["build_parser", "config_from", "main"]

ENV_PREFIX = "TRACKER_"


def _field_help() -> list[tuple[str, type, Any, str]]:
    """(name, type, default, description) of every config field."""
    hints = get_type_hints(TrackerConfig, include_extras=True)
    rows = []
    for field in msgspec.structs.fields(TrackerConfig):
        base, *meta = get_args(hints[field.name])
        description = next((m.description for m in meta if m.description), "")
        rows.append((field.name, base, field.default, description))
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``serve`` gets one flag per config field."""
    parser = argparse.ArgumentParser(
        prog="tracker",
        description="Real-time vehicle tracker: GPS pings in, live H3 area feeds out (SSE).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve",
        help="run the tracker HTTP service",
        description="Run the tracker service. Every option can also be set with the "
        "environment variable shown; a flag wins over the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, kind, default, description in _field_help():
        flags = ["--" + name.replace("_", "-")]
        if name.endswith("_s"):
            flags.append("--" + name[:-2].replace("_", "-"))
        serve_parser.add_argument(
            *flags,
            dest=name,
            type=kind,
            default=None,
            metavar=kind.__name__.upper(),
            help=f"{description} [env {ENV_PREFIX}{name.upper()}; default {default!r}]",
        )
    return parser


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> TrackerConfig:
    """Merge flags over ``TRACKER_*`` environment variables over defaults, and validate."""
    values: dict[str, Any] = {}
    for name, *_ in _field_help():
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = env_value
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return load_config(values)


async def _serve_until_signalled(config: TrackerConfig) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as main_nursery:
        main_nursery.start_soon(_wait_for_signal, shutdown)
        binds = await main_nursery.start(serve, config, shutdown)
        for url in binds:
            print(f"tracker: serving on {url}  (feeds: {url}/feed?bbox=..., ingest: {url}/ingest)")
        print("tracker: press Ctrl-C to stop", flush=True)
        await shutdown.wait()
        # serve() returns once its graceful shutdown is over; then nothing is left.
    print("tracker: stopped", flush=True)


async def _wait_for_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            shutdown.set()
            return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tracker`` console script."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from(args, os.environ)
    except ConfigError as exc:
        print(f"tracker: bad configuration: {exc}", file=sys.stderr)
        return 2
    trio.run(_serve_until_signalled, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
