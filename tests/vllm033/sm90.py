"""Pytest plugin (`-p tests.vllm033.sm90`, loaded by `make test-vllm033`): vLLM 0.33.0's CUDA
platform on a machine without a GPU, as if it had one H100 (compute capability 9.0).

vLLM picks its platform by asking NVML for GPUs; on a CPU machine it finds none and would
run on `UnspecifiedPlatform`. Here `current_platform` is vLLM's own CUDA platform class
(`vllm.platforms.cuda.NonNvmlCudaPlatform`, what vLLM uses where NVML is unavailable)
with the device queries answered for an H100, so vLLM's CUDA code paths (backend
selection, config checks, layer construction) run unchanged. Triton's CUDA driver reports
itself active, as on the GPU (vLLM disables its Triton code paths, the V2 model runner among
them, where it is not). It must be installed before anything imports `current_platform` or
`vllm.triton_utils`, hence a plugin rather than a fixture.

vLLM's compiled CUDA extensions (`vllm._C_stable_libtorch`, flash attention, ...) link the
driver, libcuda.so.1, and vLLM imports them and calls their host-side queries at module level.
`make test-vllm033` puts NVIDIA's driver stub on LD_LIBRARY_PATH: the toolkit's libcuda stub
(every entry point returns CUDA_ERROR_STUB_LIBRARY), as shipped inside PyNvVideoCodec, a pinned
vLLM 0.33 dependency. With it the extensions load and register their ops for real, and
torch still sees no GPU.
"""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

H100 = dict(capability=(9, 0), name="NVIDIA H100 80GB HBM3", memory=80 * 2**30, sms=132)
CUDA_ERROR_STUB_LIBRARY = 34


def _check_driver_stub() -> None:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise pytest.UsageError(f"{exc}: run `make test-vllm033`, which puts NVIDIA's libcuda stub on "
                                "LD_LIBRARY_PATH for vLLM's CUDA extensions") from exc
    status = driver.cuInit(0)
    if status != CUDA_ERROR_STUB_LIBRARY:
        raise pytest.UsageError(f"libcuda.so.1 is not NVIDIA's stub (cuInit returned {status}): this plugin mocks "
                                "the GPU and must not run against a real driver")


def _h100_platform():
    from vllm.platforms import cuda
    from vllm.platforms.interface import DeviceCapability

    class H100Platform(cuda.NonNvmlCudaPlatform):
        """vLLM's CUDA platform; device queries answered for one H100."""

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(*H100["capability"])

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return H100["name"]

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return H100["memory"]

        @classmethod
        def device_count(cls) -> int:
            return 1

        @classmethod
        def num_compute_units(cls, device_id: int = 0) -> int:
            return H100["sms"]

        @classmethod
        def is_fully_connected(cls, physical_device_ids: list[int]) -> bool:
            return True

    return H100Platform()


def pytest_configure(config):
    import vllm.platforms
    from triton.backends import backends

    assert vllm.platforms._current_platform is None, "vLLM's platform was resolved before this plugin ran"
    assert "vllm.triton_utils" not in sys.modules, "vLLM checked Triton's drivers before this plugin ran"
    _check_driver_stub()
    vllm.platforms._current_platform = _h100_platform()
    backends["nvidia"].driver.is_active = staticmethod(lambda: True)


def pytest_report_header(config):
    import vllm

    return [f"vLLM {vllm.__version__}, torch {torch.__version__}: vLLM's CUDA platform mocked as one {H100['name']} "
            f"(sm{H100['capability'][0]}{H100['capability'][1]}), NVIDIA's libcuda stub as the driver"]
