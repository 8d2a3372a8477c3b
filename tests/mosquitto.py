"""A private mosquitto broker for a test: its own port and directory, stopped and started
at will (the port is kept). Never a shared broker on 1883."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import free_port

BINARY_PLACES = ("/usr/sbin/mosquitto",)


def _binary() -> str:
    found = shutil.which("mosquitto") or next(
        (place for place in BINARY_PLACES if Path(place).exists()), None
    )
    assert found, "mosquitto is not installed (.ci/run installs it): cannot test MQTT"
    return found


@dataclass
class Mosquitto:
    """``mosquitto -c <conf>`` on a loopback port, configured in ``directory``."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest none\n"
        )
        self.process = subprocess.Popen([_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._listens():
            assert self.process.poll() is None, "mosquitto exited at start"
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def _listens(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False
