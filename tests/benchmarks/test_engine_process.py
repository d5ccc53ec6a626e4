"""An engine process and a server end with everything they started: vLLM's engine core and
workers must not outlive a timeout, a crash or a failed start (they would hold the cores the
next engine is bound to). A shell that leaves a background child stands in for vLLM."""

import os
import subprocess
import sys
import time

import pytest

from vllm_thinkv.bench.engine import EngineFailed, run_in_subprocess
from vllm_thinkv.serve.process import ServerProcess


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of an exited parent may linger as a zombie until init reaps it
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def leaves_a_child(pid_file, then: str) -> list[str]:
    """A wrapper for run_in_subprocess: start a background child (its pid to PID_FILE), then THEN."""
    return ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; {then}", "wrapper"]


@pytest.mark.parametrize("then, error", [("sleep 300", subprocess.TimeoutExpired), ("exit 3", EngineFailed)])
def test_engine_process_group_ends_with_it(tmp_path, then, error):
    pid_file = tmp_path / "child.pid"
    with pytest.raises(error):
        run_in_subprocess({"mode": "generate"}, wrapper=leaves_a_child(pid_file, then), timeout=3)
    assert wait_gone(int(pid_file.read_text()))


def test_server_stop_ends_what_a_failed_start_left(tmp_path, monkeypatch):
    """`thinkv serve` that exits at once but leaves a child, as vLLM's engine core does when
    the API server fails to start."""
    pid_file = tmp_path / "child.pid"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/bash\nsleep 300 & echo $! > {pid_file}\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    server = ServerProcess(tmp_path, [])
    with pytest.raises(RuntimeError, match="exited with code 1"):
        server.wait_ready(timeout=30)
    child = int(pid_file.read_text())
    assert alive(child)
    server.stop()
    assert wait_gone(child)
