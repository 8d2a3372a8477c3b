"""A private PostgreSQL for tests: initdb in a temporary directory, its own loopback port
and socket directory, deleted at the end. Never the machine's shared server on 5432.

We start ``postgres`` ourselves (not through ``pg_ctl``, nor pytest-postgresql, which
cannot run initdb as root) so that the test owns the server process: it can stop it,
kill it, or freeze it with all its backends to play a server that stops answering.
As root, initdb and the server run as the ``postgres`` user (PostgreSQL refuses to run
as root); as anyone else, as that user.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.processes import free_port

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    # Tests never crash the machine, only the server: a commit in the OS cache is enough.
    # (synchronous_commit stays on: a killed server must keep what it acknowledged.)
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "200",
    "log_min_messages": "warning",
    "logging_collector": "off",
}
"""What the private server runs with: fast and small (2 shared cores, many tests)."""


def postgres_binary(name: str) -> str:
    """``name`` from Debian's /usr/lib/postgresql/<version>/bin, the newest version."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: int(Path(path).parts[-3]),
    )
    assert found, f"no {name} in /usr/lib/postgresql/*/bin (.ci/run installs postgresql)"
    return found[-1]


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                children.append(int(stat.parent.name))
    return children


def _server_user() -> str | None:
    """Who runs initdb and the server: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as error:
        raise AssertionError("running as root and there is no postgres user") from error
    return "postgres"


@dataclass
class PostgresServer:
    """``postgres`` on a loopback port, with its cluster in a temporary directory."""

    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=lambda: dict(SETTINGS))
    """``postgres -c`` settings (a benchmark drops the test-only ones: fsync stays on)."""
    directory: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    _databases: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` database (the superuser's, for administration)."""
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?connect_timeout=5"

    def start(self) -> None:
        """Create the cluster (first time only) and start the server; wait until it answers."""
        user = _server_user()
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="tracker-pg-"))
            if user is not None:
                shutil.chown(self.directory, user)
            initdb = [postgres_binary("initdb"), "-D", str(self.data), "-U", "postgres"]
            initdb += ["-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
            subprocess.run(initdb, user=user, check=True, capture_output=True, timeout=60)
        command = [postgres_binary("postgres"), "-D", str(self.data), "-p", str(self.port)]
        command += ["-k", str(self.directory)]
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.directory / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, user=user, stdout=log, stderr=log)
        self._wait_until_it_answers()

    @property
    def data(self) -> Path:
        assert self.directory is not None
        return self.directory / "data"

    def create_database(self) -> str:
        """A new empty database on this server; its URL (fast: a copy of template0)."""
        name = f"test_{next(self._databases)}"
        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY file_copy")
        return self.url_of(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT); the cluster stays for :meth:`start`."""
        if self.process is None:
            return
        self.thaw()
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server and every backend at once, as a crash would."""
        if self.process is None:
            return
        self._signal_all(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP postmaster and backends: the kernel still accepts, nothing answers."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: answer again."""
        if self.process is not None:
            self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        """``signum`` to the postmaster and its children (each backend calls setsid(),
        so no process group holds them all)."""
        assert self.process is not None
        pids = [self.process.pid, *_children(self.process.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def remove(self) -> None:
        """Stop the server and delete its cluster."""
        self.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _wait_until_it_answers(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=1) as connection:
                    connection.execute("SELECT 1")
                return
            except psycopg.OperationalError as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.data.parent / "server.log").read_text(errors="replace")
                    self.remove()
                    raise AssertionError(f"postgres did not start: {error}\n{log}") from error
                time.sleep(0.05)
