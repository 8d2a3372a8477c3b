"""A private redis-server for a test: its own port, no persistence, stopped and restarted
at will. Never the shared Redis on 6379."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from tests.processes import TrackerProcess, free_port, tracker_process

INGEST_KEY_VALUE = "test-ingest-key"
"""The ingest key the tracker instances accept (what ``tests.conftest.post_pings`` sends)."""


@dataclass
class RedisServer:
    """``redis-server`` on a loopback port; :meth:`stop` and :meth:`start` keep the port."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (.ci/run installs it): cannot test the bus"
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server cannot exit
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def freeze(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: answer again, as if nothing happened."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@asynccontextmanager
async def tracker_instances(
    redis: RedisServer, count: int, *options: str
) -> AsyncIterator[list[TrackerProcess]]:
    """``count`` ``tracker serve`` processes on one Redis; each must exit cleanly."""
    base = ["--port", "0", "--tick", "0.2", "--open", "--ingest-keys", INGEST_KEY_VALUE]
    async with AsyncExitStack() as stack:
        running = [
            await stack.enter_async_context(
                tracker_process("serve", *base, *options, "--bus", redis.url, timeout=30)
            )
            for _ in range(count)
        ]
        yield running
        for process in running:
            assert await process.interrupt(timeout=20) == 0
            assert b"Traceback" not in process.output, process.output.decode()
