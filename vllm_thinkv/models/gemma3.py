"""`ThinKVGemma3ForCausalLM`: text-only Gemma 3 (`Gemma3ForCausalLM`) with thin keys.

vLLM's Gemma 3 builds `Gemma3Attention` inside its decoder layer and model
without a hook to swap it (Llama's model takes a `layer_type`), so this module
re-states the two constructors around `ThinKVAttention` and inherits
everything else (forward passes, weight mapping, logits). The attention layer
keeps what makes Gemma 3 Gemma: q/k GemmaRMSNorm before RoPE, the
query_pre_attn_scalar scale, a local and a global RoPE base, and each layer's
sliding window (`vllm_thinkv.models.attention`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3MLP, Gemma3Model
from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory, make_layers, maybe_prefix

from vllm_thinkv.models.attention import ThinKVAttention
from vllm_thinkv.models.llama_family import ThinWeights, prepare_thin


class ThinKVGemma3DecoderLayer(Gemma3DecoderLayer):
    """Gemma3DecoderLayer (its forward) with a thin attention layer."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "", *, attn_layer_type) -> None:
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = attn_layer_type(
            config=config, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
            quant_config=quant_config, bias=config.attention_bias, bias_o_proj=config.attention_bias,
            cache_config=cache_config, prefix=f"{prefix}.self_attn",
        )
        self.mlp = Gemma3MLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                             hidden_activation=config.hidden_activation, quant_config=quant_config,
                             prefix=f"{prefix}.mlp")
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, norm, GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps))


@support_torch_compile
class ThinKVGemma3Model(Gemma3Model):
    """Gemma3Model (its forward, embedding and weight mapping) over thin decoder layers."""

    def __init__(self, *, vllm_config, prefix: str = "", attn_layer_type=None) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        self.quant_config = quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: ThinKVGemma3DecoderLayer(config, cache_config, quant_config, prefix=prefix,
                                                    attn_layer_type=attn_layer_type),
            prefix=f"{prefix}.layers",
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )


class ThinKVGemma3ForCausalLM(ThinWeights, Gemma3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        thin, backend, thin_tensors = prepare_thin(vllm_config)
        config = vllm_config.model_config.hf_config
        nn.Module.__init__(self)
        self.config = config
        self.quant_config = quant_config = vllm_config.quant_config
        self.model = ThinKVGemma3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                       attn_layer_type=partial(ThinKVAttention, thin=thin, backend=backend))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self.thin = thin
        self._load_time_tensors = thin_tensors
