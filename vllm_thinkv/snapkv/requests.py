"""Per-request SnapKV budgets, through vLLM's per-request extension point.

A request asks for its own budget in `SamplingParams.extra_args` (on the OpenAI
server: the `vllm_xargs` request field), one of

    {"thinkv_snapkv_budget": 256}, {"thinkv_snapkv_budget_ratio": 0.25} or {"thinkv_snapkv_budget": "off"}

(`snapkv.budgets`: what they mean, and the rule that resolves them).

The deployment opts in by naming `SnapKVRequestBudgets` as a logits processor
(`--logits-processors vllm_thinkv.snapkv.requests:SnapKVRequestBudgets`). It
never changes logits; it is the vLLM interface that (1) checks each request's
extra_args at admission (`validate_params`; a bad value fails that request with
HTTP 400) and (2) follows each request's row in the worker's persistent batch,
which is what the attention metadata builder needs (`rows`). The engine core's
KV manager reads the same extra_args from the request (`kv_cache.SnapKVManager`),
only in deployments that name the processor (`SnapKVConfig.per_request`, set by
the deployment check); both resolve them with `budgets.kept_len`, so they agree
on every request's gap. Deployments that do not name it ignore the keys.

Why not an entry-point logits-processor plugin: vLLM loads those into every
deployment, and its V2 model runner refuses V1-interface processors.
`validate_params` is a classmethod that vLLM calls on the class in the API server, where
no processor instance (and so no deployment config) exists, so it checks what needs no
deployment (types, signs, ranges). A budget above the deployment's `max_budget` is refused
on the OpenAI server by the `serve.budget_limit` middleware, which reads the deployment from
the app; where nothing refused it, the engine caps it and logs a warning (`warn_if_capped`).
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv.budgets import PROCESSOR, PROCESSOR_NAMES, RequestBudget, request_budget
from vllm_thinkv.snapkv.config import HF_CONFIG_KEY, SnapKVConfig

logger = init_logger(f"vllm.{__name__}")


def warn_if_capped(deployment: SnapKVConfig, request: RequestBudget | None, request_id: str) -> None:
    """The engine's backstop where nothing refused the request at admission (offline `LLM`,
    a server without `serve.budget_limit`): it is served at `max_budget`, and says so."""
    above = request.above_max(deployment) if request is not None else None
    if above is not None:
        logger.warning("thinkv SnapKV: request %s: %s; serving it at max_budget", request_id, above)


# The worker's processor for each engine config, found by the metadata builder of the same
# worker (both are made by the model runner with its vllm_config; vLLM links them no other way).
_PROCESSORS: weakref.WeakValueDictionary[int, SnapKVRequestBudgets] = weakref.WeakValueDictionary()


def processor_for(vllm_config) -> SnapKVRequestBudgets | None:
    return _PROCESSORS.get(id(vllm_config))


def deployment_settings(vllm_config) -> SnapKVConfig | None:
    """A deployment's SnapKV settings: its `thinkv_snapkv` section, with `per_request` set when it
    names the processor and `resumed_prefill` under vLLM's V2 model runner (the deployment check
    and the metadata builder both read this)."""
    model_config = vllm_config.model_config
    config = SnapKVConfig.from_hf_config(model_config.hf_config)
    if config is None:
        return None
    return replace(config, per_request=processor_named(model_config.logits_processors),
                   resumed_prefill=bool(vllm_config.use_v2_model_runner))


def processor_named(logits_processors) -> bool:
    """Whether a deployment's `--logits-processors` (vLLM's `ModelConfig.logits_processors`:
    qualified names or classes) include `SnapKVRequestBudgets`."""
    return any(p is SnapKVRequestBudgets or p in PROCESSOR_NAMES for p in logits_processors or ())


class SnapKVRequestBudgets(LogitsProcessor):
    """Leaves logits alone; validates per-request budgets and tracks their batch rows."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            RequestBudget.from_extra_args(sampling_params.extra_args)
        except ValueError as e:
            raise VLLMValidationError(f"thinkv SnapKV: {e}", parameter="vllm_xargs") from e

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        hf_config = vllm_config.model_config.hf_config
        self.deployment = SnapKVConfig.from_hf_config(hf_config)
        if self.deployment is None:
            raise ThinKVError(f"per-request SnapKV budgets ({PROCESSOR}) need a SnapKV deployment: add "
                              f"--hf-overrides '{{\"{HF_CONFIG_KEY}\": {{\"budget\": ...}}}}' with the thinkv "
                              "backend, or drop the logits processor")
        self.rows: dict[int, RequestBudget] = {}  # persistent-batch row -> the request's own setting
        _PROCESSORS[id(vllm_config)] = self

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _, __: request_budget(params.extra_args))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
