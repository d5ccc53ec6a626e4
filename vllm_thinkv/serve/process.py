"""Start `thinkv serve` as a child process on 127.0.0.1 and wait until it is ready.

Used by the demo (`make demo`), the HTTP tests and the throughput benchmark.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vllm_thinkv.bench.engine import kill_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`thinkv serve MODEL ARGS --host 127.0.0.1 --port P`, output to `log` (or discarded)."""

    def __init__(self, model: str | Path, extra_args: list[str], env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm_thinkv.cli", "serve", str(model),
               "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        self.log_path = log
        self._log = open(log, "w") if log else subprocess.DEVNULL
        # Its own process group: vLLM's engine core and workers are in it too, so `stop` can end
        # what a server that failed to start left running.
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"thinkv serve exited with code {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"thinkv serve not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        """SIGTERM (vLLM shuts its engine processes down), then SIGKILL to whatever of the
        group is left (after a failed start, vLLM's engine core and workers outlive the server)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc.pid)
        self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
