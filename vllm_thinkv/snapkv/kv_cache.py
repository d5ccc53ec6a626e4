"""The vLLM side of block freeing: a KV-cache spec that carries the SnapKV
settings to the engine core, and a manager that frees a compacted prompt's gap.

Precedent: vLLM's R-SWA manager, which also frees a middle range of a running
request's blocks through `_remove_blocks_in_range` (they become the null block;
the attention backend must never read them — ours skips the gap).

The manager mirrors `tracker.SnapKVTracker`: a request's compaction step is its
first scheduled step that starts at or after the end of its prefill (start C), where
the prefill ends where the model runner's `is_prefilling` (which the worker reads) says:
V1 runner: at the prompt end (`num_computed_tokens < num_prompt_tokens`); V2 runner
(`SnapKVConfig.resumed_prefill`): at the request's length when it was (re-)admitted (its
`prefill_len`: the scheduler sends a preempted request back with all its tokens so far as
prefill; a new request's is its prompt). The manager learns each step's start as the
previous step's end (from `allocate_new_blocks`), the admitted length from the Request in
`cache_blocks`, and frees blocks [ceil(kept/bs), C // bs) once that
step has been processed, so the worker has already moved the kept tokens to
[0, kept) before any freed block can be handed to another request.

Counts (`merge`): a merging policy's slots carry ln(count) per KV head. It lives in the
page, after each (slot, KV head) row's r + d values, as one float32 padded to COUNT_BYTES
(vLLM's `state_content_bytes`, as its Triton backend packs per-token-head scales), so vLLM's
page size, block count and KV-token capacity include it and nothing is allocated beside the
cache. float32, not the cache dtype: a bf16 ln(count) would be off by up to 1.5% in the weight
at counts near e^4. The padding keeps every row 16-byte aligned, so the kernels' K/V loads stay
vectorised (`KV_ALIGNED`); it costs 16 bytes per token and KV head (6% at r = d = 64 in bf16),
only when the policy merges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.budgets import RequestBudget, kept_len, request_budget
from vllm_thinkv.snapkv.policies import COUNT_BYTES, row_extra_bytes
from vllm_thinkv.snapkv.requests import warn_if_capped


@dataclass(frozen=True, kw_only=True)
class SnapKVSpec(FullAttentionSpec):
    """A full-attention spec carrying the deployment's SnapKV settings, whole: the
    worker's tracker and layers and the engine core's manager read this object."""

    snapkv_config: SnapKVConfig

    @property
    def prefix_cacheable(self) -> bool:
        # Compaction rewrites prompt blocks in place: their hashes would lie.
        return False

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, snapkv_config: SnapKVConfig) -> SnapKVSpec:
        fields = {name: getattr(spec, name) for name in FullAttentionSpec.__dataclass_fields__}
        return cls(**fields, snapkv_config=snapkv_config)

    @classmethod
    def merge(cls, specs: list[SnapKVSpec]) -> SnapKVSpec:
        settings = {s.snapkv_config for s in specs}
        assert len(settings) == 1, f"all SnapKV layers must share one setting, got {settings}"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        return cls.from_spec(base, specs[0].snapkv_config)


class SnapKVManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: SnapKVSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.snapkv_config = kv_cache_spec.snapkv_config
        self._scheduled_end: dict[str, int] = {}  # end of the request's latest scheduled step
        self._compaction_start: dict[str, int] = {}  # C, once its compaction step is scheduled
        self._requests: dict[str, RequestBudget | None] = {}  # each request's own budget (`snapkv.requests`)
        self._prefill_end: dict[str, int] = {}  # V2 runner: the request's length at (re-)admission
        if self.snapkv_config.per_request or self.snapkv_config.resumed_prefill:
            # `cache_blocks` is the one manager call that carries the Request (hence its extra_args and
            # length). The coordinator skips it when prefix caching is off; ours caches nothing (the spec
            # is never prefix-cacheable).
            self.enable_caching = True

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        if num_prompt_tokens is None:
            return
        # Called before the step is allocated: this step starts where the last one ended.
        start = self._scheduled_end.get(request_id, 0)
        prefill_end = max(num_prompt_tokens, self._prefill_end.get(request_id, 0))
        if request_id not in self._compaction_start and start >= prefill_end:
            self._compaction_start[request_id] = start
        compaction_start = self._compaction_start.get(request_id)
        if compaction_start is None or processed_computed_tokens <= compaction_start:
            return  # not compacted yet, or the compaction step has not run yet
        kept = kept_len(self.snapkv_config, self._requests.get(request_id), compaction_start)
        if kept is not None:
            self._remove_blocks_in_range(request_id, cdiv(kept, self.block_size), compaction_start // self.block_size)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        self._scheduled_end[request_id] = num_tokens_main_model
        return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        if self.snapkv_config.resumed_prefill and request.request_id not in self._prefill_end:
            # Called in the step that (re-)admits the request, where the V2 runner's prefill_len is
            # taken from the same Request (`len(request._all_token_ids)`, vLLM's Scheduler.schedule).
            self._prefill_end[request.request_id] = request.num_tokens
        # Only where the worker reads requests' budgets too (the processor validated them at admission).
        if self.snapkv_config.per_request and request.request_id not in self._requests:
            params = request.sampling_params
            budget = request_budget(params.extra_args if params is not None else None)
            warn_if_capped(self.snapkv_config, budget, request.request_id)
            self._requests[request.request_id] = budget
        # Nothing to cache: the spec is never prefix-cacheable (and FullAttentionManager's partial-tail
        # caching, for hash blocks smaller than ours, does not check that).

    def pop_blocks_for_free(self, request_id: str):
        # Every way vLLM frees a request (finished, aborted, preempted; deferred frees
        # included) goes through here: a recomputed request starts over from position 0.
        self._scheduled_end.pop(request_id, None)
        self._compaction_start.pop(request_id, None)
        self._requests.pop(request_id, None)
        self._prefill_end.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def split_packed(kv: torch.Tensor, r: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A layer's cache, vLLM's logical view [B, Hkv, N, C] (C = r + d, or r + d + COUNT_BYTES / element
    size with counts) -> key [B, N, Hkv, r], value [B, N, Hkv, d] and the float32 ln-counts [B, N, Hkv]
    (None without counts), all views."""
    kv = kv.transpose(1, 2)
    extra = kv.shape[-1] - r - d
    if extra == 0:
        return kv[..., :r], kv[..., r:], None
    assert extra * kv.element_size() == COUNT_BYTES, f"cache rows of {kv.shape[-1]} values for r={r}, d={d}"
    counts = kv[..., r + d : r + d + 4 // kv.element_size()].view(torch.float32)[..., 0]
    return kv[..., :r], kv[..., r : r + d], counts


def snapkv_spec(spec: FullAttentionSpec, snapkv_config: SnapKVConfig) -> SnapKVSpec:
    """The layer's spec with SnapKV settings; refuses to go on if vLLM would manage it
    with a manager that never frees (the plugin's registration failed)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    extra = row_extra_bytes(snapkv_config)
    if extra and spec.state_content_bytes is None:  # (None: dense K/V rows, not yet widened)
        spec = replace(spec, state_content_bytes=spec.state_content_size_bytes + extra)
    out = SnapKVSpec.from_spec(spec, snapkv_config)
    manager = KVCacheSpecRegistry.get_manager_class(out)
    if manager is not SnapKVManager:
        raise ThinKVError(f"thinkv SnapKV: vLLM would manage its KV cache with {getattr(manager, '__name__', manager)}, "
                          "which never frees blocks (the vllm-thinkv plugin did not register its KV-cache spec; see the log)")
    return out


def register_snapkv_spec() -> None:
    """Register SnapKVSpec/SnapKVManager with vLLM's KV-cache spec registry.

    The registry fills in vLLM's built-in specs only while it is empty, so they
    are registered first; otherwise a worker that loads this plugin before the
    engine core registers anything would know only our spec.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SnapKVSpec, SnapKVManager, uniform_type_base_spec=FullAttentionSpec)
