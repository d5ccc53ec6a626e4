"""The backend vLLM resolves for `--attention-backend thinkv` (the path registered
for `CUSTOM`, `BACKEND_PATH`): `ThinKVBackend` configured for the deployment
being built.

vLLM resolves a backend path inside the process that builds the model, while its
config is current (`set_current_vllm_config`), so `ThinKVBackend` here is looked
up (PEP 562) rather than stored: the deployment is checked and its settings are
carried by the class returned (`deployment.check_deployment`). Outside a
deployment (no current config) it is the unconfigured base class.
"""

from __future__ import annotations

BACKEND_PATH = f"{__name__}.ThinKVBackend"


def __getattr__(name: str):
    if name != "ThinKVBackend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm.config import get_current_vllm_config_or_none

    from vllm_thinkv.backend.backend import ThinKVBackend
    from vllm_thinkv.backend.deployment import check_deployment

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None or vllm_config.model_config is None:
        return ThinKVBackend
    return check_deployment(vllm_config)
