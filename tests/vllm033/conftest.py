"""tests/vllm033 needs vLLM 0.33.0 and its CUDA platform mocked by `sm90.py`: `make test-vllm033`.
Plain `pytest` skips the folder (tests/conftest.py); naming it without the plugin is an error."""

import sys

import pytest

if "tests.vllm033.sm90" not in sys.modules:
    raise pytest.UsageError("tests/vllm033 runs against vLLM 0.33.0 on its mocked CUDA platform: "
                            "use `make test-vllm033` (pytest -p tests.vllm033.sm90 in .venv-vllm033)")
