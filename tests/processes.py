"""The ``tracker`` command as a child process, for tests of the real program end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

READY = b"press Ctrl-C"
"""What every long-running ``tracker`` command prints once it is serving."""


@dataclass
class TrackerProcess:
    """A running ``python -m tracker ...``: its first URL, and its output so far."""

    process: trio.Process
    stdout: trio.abc.ReceiveStream
    url: str
    output: bytes

    async def interrupt(self, timeout: float = 20) -> int:
        """Ctrl-C it, read the rest of its output and wait for it to exit; its exit code."""
        self.process.send_signal(signal.SIGINT)
        with trio.fail_after(timeout):
            while chunk := await self.stdout.receive_some():
                self.output += chunk
            return await self.process.wait()


@asynccontextmanager
async def tracker_process(*args: str, timeout: float = 30) -> AsyncIterator[TrackerProcess]:
    """Start ``python -m tracker *args`` and wait until it serves; killed on exit if alive."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tracker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(timeout):
            while READY not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, output
                output += chunk
        url = next(w for w in output.decode().split() if w.startswith("http://127.0.0.1:"))
        yield TrackerProcess(process, process.stdout, url.split("/feed")[0].rstrip("/"), output)
    finally:
        process.kill()
        await process.wait()


def free_port() -> int:
    """A loopback port nobody listens on now (for a server that must keep its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
