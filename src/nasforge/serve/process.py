"""Run :func:`nasforge.serve.server.serve` in a child process (its own process group).

Used by the serving tests and the load benchmark: start on a free 127.0.0.1 port, wait for
``/health``, and stop the whole process group (LitServe spawns workers) with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``serve(source, target, **kwargs)`` on 127.0.0.1 in a child process."""

    def __init__(self, source: str | Path, target: str, **kwargs: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (
            "import sys, json; from nasforge.serve.server import serve; "
            f"serve({str(source)!r}, {target!r}, **json.loads(sys.argv[1]))"
        )
        payload = {"host": "127.0.0.1", "port": self.port, **kwargs}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(payload)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Block until ``/health`` answers 200.

        Raises:
            RuntimeError: The server exited, or was not healthy within ``timeout_s``.
        """
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited during start-up:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after 20 s)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
