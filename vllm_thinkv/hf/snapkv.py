"""Reference compaction on a transformers model (stock or thin-key): the kept token
indices, and greedy generation from the compacted cache.

Independent of the serving path: the window attention probabilities are the ones
the HF model itself computes (eager attention, which returns them), not a
recomputation from cached keys and saved queries, and the cache is compacted in
transformers' own `DynamicCache`. The scoring is the deployment's policy
(`snapkv.policies`, the code the backend runs; checked against float64 loops in
tests/snapkv), fed in float64.

Two protocols: question-aware (the whole prompt is prefilled and compacted, as in
vLLM) and question-agnostic (`generate(..., question_ids=...)`: the document is
compacted before the question is appended, as for a cache reused by several
questions; kvpress's default).

With a merging policy (`merge`) the compacted cache holds the policy's merged keys and values,
and the model attends with each slot's log-count added to its logit (`counted_attention`:
eager attention plus that bias, registered with transformers as `thinkv_counts`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from vllm_thinkv.hf.capture import attention_modules
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.policies import Policy, PromptKV, Selection, make_policy

COUNTED_ATTENTION = "thinkv_counts"  # the transformers attention implementation that adds slot log-counts


@dataclass
class Prefilled:
    """One prompt after prefill: what every policy and budget is chosen from."""

    prompt_len: int
    window: int
    window_probs: list[torch.Tensor]  # per layer [H, w, P] float64, the model's own attention
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [1, Hkv, P, *] as cached
    logits: torch.Tensor  # the last prompt position's logits


@torch.no_grad()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, window: int) -> Prefilled:
    """Run the prompt [1, P] with eager attention, keeping the last `window` rows of each
    layer's attention probabilities and the cache."""
    return prefill_prefixes(model, input_ids, window, [input_ids.shape[1]])[0]


@torch.no_grad()
def prefill_prefixes(model: torch.nn.Module, input_ids: torch.Tensor, window: int,
                     ends: list[int]) -> list[Prefilled]:
    """One forward pass of the prompt [1, P], seen as each of its prefixes [0, e) for e in
    `ends`: attention is causal, so the prefix's cache and window attention (rows e-w..e-1,
    columns < e) are those of a prefill of the prefix alone (up to summation order)."""
    from transformers import DynamicCache

    window_probs: dict[int, list[torch.Tensor]] = {}

    def keep_window(layer: int):
        def hook(module, args, kwargs, output):
            window_probs[layer] = [output[1][0, :, e - window:e, :e].double() for e in ends]  # [H, w, e]
        return hook

    hf_config = model.config
    cache = DynamicCache(config=hf_config)
    previous = hf_config._attn_implementation
    hf_config._attn_implementation = "eager"  # the implementation that returns attention probabilities
    handles = [m.register_forward_hook(keep_window(i), with_kwargs=True) for i, m in enumerate(attention_modules(model))]
    try:
        logits = model(input_ids=input_ids.to(model.device), past_key_values=cache, use_cache=True).logits
    finally:
        hf_config._attn_implementation = previous
        for h in handles:
            h.remove()
    return [Prefilled(e, window, [window_probs[i][j] for i in range(len(window_probs))],
                      [(layer.keys[:, :, :e], layer.values[:, :, :e]) for layer in cache.layers], logits[0, e - 1])
            for j, e in enumerate(ends)]


def selections(prefilled: Prefilled, policy: Policy, budget: int) -> list[Selection]:
    """The policy's selection per layer (float64; with `merge`, the merged slots too), on the model's device."""
    if policy.window != prefilled.window:
        raise ValueError(f"prefilled with window {prefilled.window}, policy window {policy.window}")
    out = []
    for probs, (keys, values) in zip(prefilled.window_probs, prefilled.kv):
        group = probs.shape[0] // keys.shape[1]
        prompt = PromptKV(keys[0].transpose(0, 1).double(), values[0].transpose(0, 1).double(),
                          lambda h, probs=probs: probs[h * group:(h + 1) * group])
        out.append(policy.select(prompt, budget))
    return out


def select(prefilled: Prefilled, policy: Policy, budget: int) -> list[torch.Tensor]:
    """Kept prompt-token indices per layer, each [Hkv, budget] (window excluded), on the CPU."""
    return [s.indices.cpu() for s in selections(prefilled, policy, budget)]


def counted_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      thinkv_log_counts: list[torch.Tensor] | None = None, **kwargs):
    """transformers' eager attention with ln(count) of the first slots of each KV head added to their logits:
    `thinkv_log_counts[layer]` [Hkv, n] for cache slots [0, n) (the compacted prompt); later slots count 1."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    counts = thinkv_log_counts[module.layer_idx]
    num_kv_heads, n = counts.shape
    bias = torch.zeros(num_kv_heads, key.shape[-2], dtype=torch.float32, device=key.device)
    bias[:, :n] = counts
    bias = bias.repeat_interleave(query.shape[1] // num_kv_heads, dim=0)[None, :, None, :]  # [1, H, 1, S]
    mask = bias if attention_mask is None else attention_mask[..., : key.shape[-2]] + bias
    return eager_attention_forward(module, query, key, value, mask, scaling, dropout, **kwargs)


def _register_counted_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(COUNTED_ATTENTION, counted_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(COUNTED_ATTENTION, eager_mask)


@torch.no_grad()
def generate(model: torch.nn.Module, prefilled: Prefilled, selections: list[torch.Tensor | Selection] | None,
             max_new_tokens: int, question_ids: list[int] | None = None,
             stop: Collection[int] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation after `prefilled`, each layer's cache compacted to its selection (per
    KV head, the selected tokens in position order, then the window; None: the full cache). A
    `Selection` that merges puts its merged keys and values in the kept slots and their counts into
    the attention (`counted_attention`).

    Without `question_ids` the first token comes from the full prefill (as in the SnapKV
    paper); with them, the question is run through the compacted cache first. New tokens
    use their true positions. Stops after a token in `stop`. Returns the token ids and,
    per step, the log-probabilities over the vocabulary."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    prompt_len, w = prefilled.prompt_len, prefilled.window
    log_counts: list[torch.Tensor] = []
    for i, (keys, values) in enumerate(prefilled.kv):
        if selections is not None:
            sel = selections[i]
            selected = sel.indices if isinstance(sel, Selection) else sel
            window = torch.arange(prompt_len - w, prompt_len).expand(selected.shape[0], w)
            keep = torch.cat([selected.cpu(), window], dim=1).to(keys.device)[None, :, :, None]  # [1, Hkv, kept, 1]
            keys = keys.gather(2, keep.expand(-1, -1, -1, keys.shape[-1]))
            values = values.gather(2, keep.expand(-1, -1, -1, values.shape[-1]))
            if isinstance(sel, Selection) and sel.log_counts is not None:
                budget = selected.shape[1]
                keys[0, :, :budget] = sel.keys.to(keys)
                values[0, :, :budget] = sel.values.to(values)
                log_counts.append(sel.log_counts.float().to(keys.device))
        cache.update(keys, values, i)
    counted = dict(thinkv_log_counts=log_counts) if log_counts else {}
    if counted:
        _register_counted_attention()

    def step(ids: list[int], start: int) -> torch.Tensor:
        config = model.config
        previous = config._attn_implementation
        if counted:
            config._attn_implementation = COUNTED_ATTENTION
        try:
            return model(input_ids=torch.tensor([ids], device=model.device),
                         position_ids=torch.arange(start, start + len(ids), device=model.device)[None],
                         past_key_values=cache, use_cache=True, **counted).logits[0, -1]
        finally:
            config._attn_implementation = previous

    position = prompt_len
    logits = prefilled.logits
    if question_ids:
        logits = step(list(question_ids), position)
        position += len(question_ids)
    tokens, logprobs = [], []
    for n in range(max_new_tokens):
        step_logprobs = logits.float().log_softmax(-1)
        tokens.append(int(step_logprobs.argmax()))
        logprobs.append(step_logprobs.cpu())
        if n + 1 == max_new_tokens or tokens[-1] in stop:
            break
        logits = step([tokens[-1]], position + n)
    return tokens, logprobs


def _checked(config: SnapKVConfig, prompt_len: int) -> int:
    kept = config.kept_len(prompt_len)
    if kept is None:
        raise ValueError(f"a {prompt_len}-token prompt is not compacted with {config}")
    return kept - config.window


@torch.no_grad()
def snapkv_reference(model: torch.nn.Module, input_ids: torch.Tensor, config: SnapKVConfig) -> list[torch.Tensor]:
    """Kept prompt-token indices per layer, each [Hkv, budget] (window excluded), for the
    prompt `input_ids` [1, P] and the deployment's settings (policy included). Raises
    ValueError if the prompt is too short to compact."""
    budget = _checked(config, input_ids.shape[1])
    return select(prefill(model, input_ids, config.window), make_policy(config), budget)


@torch.no_grad()
def snapkv_generate(model: torch.nn.Module, input_ids: torch.Tensor, config: SnapKVConfig,
                    max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation with the prompt's cache compacted after prefill (question-aware).
    Returns the generated token ids and, per step, the log-probabilities over the vocabulary."""
    budget = _checked(config, input_ids.shape[1])
    prefilled = prefill(model, input_ids, config.window)
    return generate(model, prefilled, selections(prefilled, make_policy(config), budget), max_new_tokens)
