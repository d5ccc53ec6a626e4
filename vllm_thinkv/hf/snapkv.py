"""Reference SnapKV on a transformers model (stock or thin-key): the kept token
indices, and greedy generation from the compacted cache.

Independent of the serving path: the attention probabilities are the ones the
HF model itself computes (eager attention, which returns them), not a
recomputation from cached keys and saved queries, and the cache is compacted
in transformers' own `DynamicCache`. Only the post-processing follows the same
definition (sum over the window queries, pool, average over each GQA group,
top-`budget` per KV head with ties to the earlier token, position order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_thinkv.hf.capture import attention_modules
from vllm_thinkv.snapkv.config import SnapKVConfig


def _prefill_and_select(model, input_ids: torch.Tensor, config: SnapKVConfig, cache):
    """Run the prompt; return (selections per layer [Hkv, budget], last-position logits)."""
    prompt_len = input_ids.shape[1]
    kept = config.kept_len(prompt_len)
    if kept is None:
        raise ValueError(f"a {prompt_len}-token prompt is not compacted with {config}")
    w, budget = config.window, kept - config.window
    hf_config = model.config
    group = hf_config.num_attention_heads // hf_config.num_key_value_heads
    window_probs: dict[int, torch.Tensor] = {}

    def keep_window(layer: int):
        def hook(module, args, kwargs, output):
            window_probs[layer] = output[1][0, :, -w:, :].double()  # [H, w, P]
        return hook

    previous = hf_config._attn_implementation
    hf_config._attn_implementation = "eager"  # the implementation that returns attention probabilities
    handles = [m.register_forward_hook(keep_window(i), with_kwargs=True) for i, m in enumerate(attention_modules(model))]
    try:
        logits = model(input_ids=input_ids.to(model.device), past_key_values=cache, use_cache=cache is not None).logits
    finally:
        hf_config._attn_implementation = previous
        for h in handles:
            h.remove()

    pool = F.max_pool1d if config.pooling == "max" else F.avg_pool1d
    selections = []
    for layer in range(len(window_probs)):
        if config.policy == "recent":
            num_kv_heads = hf_config.num_key_value_heads
            selections.append(torch.arange(prompt_len - w - budget, prompt_len - w).expand(num_kv_heads, budget).clone())
            continue
        votes = window_probs[layer][:, :, : prompt_len - w].sum(dim=1)  # [H, P - w]
        pooled = pool(votes[:, None, :], config.kernel_size, stride=1, padding=config.kernel_size // 2)[:, 0]
        scores = pooled.view(-1, group, prompt_len - w).mean(dim=1)  # [Hkv, P - w]
        best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :budget]
        selections.append(best.sort(dim=-1).values.cpu())
    return selections, logits[0, -1]


@torch.no_grad()
def snapkv_reference(model: torch.nn.Module, input_ids: torch.Tensor, config: SnapKVConfig) -> list[torch.Tensor]:
    """Kept prompt-token indices per layer, each [Hkv, budget] (window excluded), for the
    prompt `input_ids` [1, P]. Raises ValueError if the prompt is too short to compact."""
    return _prefill_and_select(model, input_ids, config, cache=None)[0]


@torch.no_grad()
def snapkv_generate(model: torch.nn.Module, input_ids: torch.Tensor, config: SnapKVConfig,
                    max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation with SnapKV applied to the prompt's cache after prefill.

    Returns the generated token ids and, per step, the log-probabilities over the
    vocabulary. The first token comes from the full prefill (as in the paper);
    then each layer's cache keeps, per KV head, the selected tokens (in position
    order) and the window, and decode tokens use their true positions.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    selections, logits = _prefill_and_select(model, input_ids, config, cache)
    prompt_len, w = input_ids.shape[1], config.window
    for layer, selected in zip(cache.layers, selections):
        window = torch.arange(prompt_len - w, prompt_len).expand(selected.shape[0], w)
        keep = torch.cat([selected, window], dim=1).to(layer.keys.device)[None, :, :, None]  # [1, Hkv, kept, 1]
        layer.keys = layer.keys.gather(2, keep.expand(-1, -1, -1, layer.keys.shape[-1]))
        layer.values = layer.values.gather(2, keep.expand(-1, -1, -1, layer.values.shape[-1]))
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        step_logprobs = logits.float().log_softmax(-1)
        tokens.append(int(step_logprobs.argmax()))
        logprobs.append(step_logprobs.cpu())
        if step + 1 < max_new_tokens:
            logits = model(input_ids=torch.tensor([[tokens[-1]]], device=model.device),
                           position_ids=torch.tensor([[prompt_len + step]], device=model.device),
                           past_key_values=cache, use_cache=True).logits[0, -1]
    return tokens, logprobs
