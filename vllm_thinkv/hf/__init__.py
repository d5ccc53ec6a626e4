"""Hugging Face (transformers) side of vllm-thinkv: the reference models.

`load(path)` returns a transformers causal LM for an original or thin-key
checkpoint (imported lazily so that `import vllm_thinkv.hf` stays cheap).
"""


def load(path, dtype=None, device="cpu"):
    """See `vllm_thinkv.hf.thin_model.load`."""
    import torch

    from vllm_thinkv.hf.thin_model import load as _load

    return _load(path, dtype=dtype or torch.float32, device=device)
