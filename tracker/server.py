"""Serving the app with Hypercorn's Trio worker, in this process, with a deadline shutdown.

:func:`serve` starts the core (:meth:`Tracker.run`) and then Hypercorn, both in its
``service_nursery``, and runs until ``shutdown`` is set; then it begins the core's shutdown
(:meth:`Tracker.shutdown`: not ready, every feed ends with a final event), stops
accepting, gives open responses ``shutdown_grace_s`` before they are cancelled, and only
then stops the core. If a core task crashes, the nursery cancels Hypercorn and the error
is raised out of :func:`serve`: the process exits non-zero rather than stay half-alive.
Listening sockets get two options that every accepted connection inherits:

* ``TCP_USER_TIMEOUT = write_timeout_s``: bytes (heartbeats included) that a peer does not
  acknowledge within this time make the kernel abort the connection. This is the write
  timeout that reaps dead peers (half-open TCP), which Hypercorn's shielded sends cannot
  be given from the application.
* ``SO_SNDBUF = sndbuf_bytes``: bounds the kernel memory a stalled client can pin.
"""

from __future__ import annotations

import logging
import socket

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hypercorn_serve

from tracker.app import create_app
from tracker.config import TrackerConfig
from tracker.logs import AccessLog
from tracker.service import Tracker

__all__ = ["serve"]


class _TunedHypercornConfig(HypercornConfig):
    """Hypercorn's config, plus our socket options on every listening socket."""

    def __init__(self, config: TrackerConfig) -> None:
        super().__init__()
        self._tracker_config = config
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.bind = [f"{host}:{config.port}"]
        self.graceful_timeout = config.shutdown_grace_s
        self.backlog = config.backlog
        self.accesslog = None  # tracker.logs.AccessLog logs requests (config.access_log)
        self.errorlog = logging.getLogger("hypercorn.error")  # no handler of its own
        if config.certfile:
            self.certfile = config.certfile
            self.keyfile = config.keyfile

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            _tune_socket(sock, self._tracker_config)
        return sockets


def _tune_socket(sock: socket.socket, config: TrackerConfig) -> None:
    """Set the per-connection write timeout and send-buffer bound (inherited on accept)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        timeout_ms = max(1, round(config.write_timeout_s * 1000))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.sndbuf_bytes)


async def serve(
    config: TrackerConfig,
    shutdown: trio.Event,
    *,
    tracker: Tracker | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set; reports the bound URLs through ``task_status``.

    Raises whatever crashed the core (see the module docstring).
    """
    core = tracker or Tracker(config)
    app = create_app(core)

    async def shutdown_core_then_stop() -> None:
        await shutdown.wait()
        core.shutdown()

    async with trio.open_nursery() as service_nursery:
        await service_nursery.start(core.run)
        await hypercorn_serve(
            AccessLog(app) if config.access_log else app,
            _TunedHypercornConfig(config),
            shutdown_trigger=shutdown_core_then_stop,
            task_status=task_status,
        )
        service_nursery.cancel_scope.cancel()
