"""The ``tracker`` command as a child process, for tests of the real program end to end.

One implementation, :class:`TrackerChild`, starts ``python -m tracker ...``, reads its
output until it serves and stops it; every read has a deadline, so a child that hangs or
dies fails the test instead of hanging it. Two front ends: :func:`tracker_child` for plain
(synchronous) tests and fixtures, :func:`tracker_process` for Trio tests (the blocking
parts run in a worker thread, each still under its own deadline).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager

import trio

READY = b"press Ctrl-C"
"""What every long-running ``tracker`` command prints once it is serving."""

QUIET_ENV = {"TRACKER_HISTORY": "off", "TRACKER_REVOCATIONS_FILE": "", "TRACKER_META_FILE": ""}
"""What child trackers get unless a test says otherwise: no history or revocations file in
the working directory (``serve`` and ``demo`` keep them by default); pass ``--history PATH``
or ``--revocations-file PATH``."""

CHUNK = 65536


class TrackerChild:
    """A running ``python -m tracker *args``: its first URL, and its output so far.

    Output (stdout and stderr together) is read only by :meth:`wait_ready` and
    :meth:`interrupt`, each with a deadline; ``output`` holds everything read so far.
    """

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tracker", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **QUIET_ENV, **(env or {})},
        )
        assert self.process.stdout is not None
        self._stdout = self.process.stdout
        self.output = b""
        self.url = ""

    def wait_ready(self, timeout: float) -> str:
        """Read output until the child says it serves; its first URL (AssertionError if not)."""
        deadline = time.monotonic() + timeout
        while READY not in self.output:
            chunk = self._read(deadline)
            assert chunk is not None, f"not serving after {timeout} s: {self.output.decode()}"
            assert chunk, f"exited before serving: {self.output.decode()}"
            self.output += chunk
        url = next(w for w in self.output.decode().split() if w.startswith("http://127.0.0.1:"))
        self.url = url.split("/feed")[0].rstrip("/")
        return self.url

    def interrupt(self, timeout: float = 20) -> int:
        """Ctrl-C it, read the rest of its output and wait for it to exit; its exit code."""
        deadline = time.monotonic() + timeout
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        while chunk := self._read(deadline):
            self.output += chunk
        assert chunk is not None, f"still running {timeout} s after SIGINT: {self.output.decode()}"
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def kill(self) -> None:
        """Kill it if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self._stdout.close()

    def _read(self, deadline: float) -> bytes | None:
        """The next bytes of output; b"" at its end, None if nothing came before ``deadline``."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            if not selector.select(max(0.0, deadline - time.monotonic())):
                return None
        return os.read(self._stdout.fileno(), CHUNK)


@contextmanager
def tracker_child(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30
) -> Iterator[TrackerChild]:
    """Start ``python -m tracker *args`` and wait until it serves; killed on exit if alive.

    ``env`` adds to (or overrides) this process's environment.
    """
    child = TrackerChild(*args, env=env)
    try:
        child.wait_ready(timeout)
        yield child
    finally:
        child.kill()


class TrackerProcess:
    """A :class:`TrackerChild` seen from Trio: the same data, an awaitable ``interrupt``."""

    def __init__(self, child: TrackerChild) -> None:
        self.child = child

    @property
    def url(self) -> str:
        return self.child.url

    @property
    def output(self) -> bytes:
        return self.child.output

    async def interrupt(self, timeout: float = 20) -> int:
        """Ctrl-C it, read the rest of its output and wait for it to exit; its exit code."""
        return await trio.to_thread.run_sync(self.child.interrupt, timeout)


@asynccontextmanager
async def tracker_process(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30
) -> AsyncIterator[TrackerProcess]:
    """Start ``python -m tracker *args`` and wait until it serves; killed on exit if alive.

    ``env`` adds to (or overrides) this process's environment.
    """
    child = TrackerChild(*args, env=env)
    try:
        await trio.to_thread.run_sync(child.wait_ready, timeout)
        yield TrackerProcess(child)
    finally:
        child.kill()


def run_tracker(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tracker *args`` to its end (a command expected to stop by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "tracker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **QUIET_ENV, **(env or {})},
        check=False,
    )


def free_port() -> int:
    """A loopback port nobody listens on now (for a server that must keep its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
