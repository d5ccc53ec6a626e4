"""Engine runs shared by several test modules (each engine start costs ~20-35 s)."""

import pytest

from tests.vllm.engine import make_spec, run_engine


@pytest.fixture(scope="session")
def smollm2_runs(smollm2_dir):
    """SmolLM2 on stock vLLM (plugin installed, not asked) and on thinkv (r = d, default CPU ops)."""
    spec = make_spec(smollm2_dir)
    return run_engine(spec), run_engine({**spec, "engine": {**spec["engine"], "attention_backend": "THINKV"}},
                                        probes=("attention_ops",))
