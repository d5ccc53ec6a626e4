"""Thin-key compression: calibration, one file per method (`pairs`, `pca`, `svd`),
rank allocation, QK fine-tuning and the checkpoint writer.

Public entry points: `compress_model` (in memory, used by vLLM's load-time path)
and `compress_pretrained` (folder in, `(config section, tensors)` out).
"""

from vllm_thinkv.compress.api import METHODS, calibration_windows, compress_model  # noqa: F401
from vllm_thinkv.compress.pretrained import compress_pretrained  # noqa: F401
