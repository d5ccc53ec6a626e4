"""Post-prefill compaction policies, kvpress style: one small file per policy, each a
frozen dataclass of its settings behind `base.Policy`; `make_policy` builds the
deployment's policy from its `thinkv_snapkv` settings (`policy` names it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_thinkv.snapkv.policies.base import Policy, PromptKV, Selection, top_tokens
from vllm_thinkv.snapkv.policies.keydiff import KeyDiffPolicy
from vllm_thinkv.snapkv.policies.merge import MergePolicy
from vllm_thinkv.snapkv.policies.recent import RecentPolicy
from vllm_thinkv.snapkv.policies.snapkv import SnapKVPolicy
from vllm_thinkv.snapkv.policies.value_aware import ValueAwarePolicy

if TYPE_CHECKING:
    from vllm_thinkv.snapkv.config import SnapKVConfig

# The names `SnapKVConfig` accepts (config.POLICIES) map to these classes (tests check both lists agree).
REGISTRY: dict[str, type[Policy]] = {cls.name: cls for cls in (SnapKVPolicy, RecentPolicy, ValueAwarePolicy,
                                                                KeyDiffPolicy, MergePolicy)}


def make_policy(config: SnapKVConfig) -> Policy:
    return REGISTRY[config.policy].from_config(config)


# Per (slot, KV head) row of a merging policy's cache: one float32 ln(count), padded to 16 bytes so that the
# row's K and V stay 16-byte aligned (the layout: `snapkv.kv_cache`).
COUNT_BYTES = 16


def merges(config: SnapKVConfig) -> bool:
    """Whether the deployment's policy merges tokens: its cache then holds a log-count per slot and KV head."""
    return REGISTRY[config.policy].merges


def row_extra_bytes(config: SnapKVConfig | None) -> int:
    """Bytes each cached (token, KV head) row carries besides its r + d values under these settings
    (vLLM's page size and the capacity model both count them)."""
    return COUNT_BYTES if config is not None and merges(config) else 0


__all__ = ["COUNT_BYTES", "REGISTRY", "row_extra_bytes", "KeyDiffPolicy", "MergePolicy", "merges", "Policy", "PromptKV", "RecentPolicy", "Selection", "SnapKVPolicy",
           "ValueAwarePolicy", "make_policy", "top_tokens"]
