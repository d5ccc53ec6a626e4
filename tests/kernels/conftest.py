"""Kernel test fixtures.

One torch thread per test: on a small shared CPU, torch's thread pool turns the float64 reference's many tiny
ops into spin-waits (measured 160x slower with 2 threads under load); the Triton
interpreter is single-threaded anyway. Restored after each test.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Plan launches with the H100 table (big tiles, the split heuristic) even in the interpreter.

    On a real GPU the device's own table is already in use and is left alone (another
    GPU's shared-memory budget could make H100 tiles unlaunchable there).
    """
    if not torch.cuda.is_available():
        from vllm_thinkv.kernels import launch

        monkeypatch.setattr(launch, "device_facts", lambda device: launch.DeviceFacts("sm90", 132, 232448))
