"""`ThinKVAttention`: a Llama-family attention layer with r-dim queries/keys.

It mirrors `vllm_thinkv.hf.thin_attention` (the transformers reference) in
vLLM's parallel layers. Two forms (see `vllm_thinkv.config`):

* rope_subspace: thin q/k rows in `qkv_proj` (head size r), RoPE over the r dims
  with the layer's per-KV-head inverse frequencies (`rope_inv_freq [Hkv, r/2]`,
  fp32; rotate_half layout, query head h uses KV head h // g);
* post_rope_projection: the original q/k and RoPE at full d, then per-KV-head
  bases: q̃ = qᵀ·q_basis, k̃ = kᵀ·k_basis (`[Hkv, d, r]`).
* shared_projection: as above, but one key latent per group of S KV heads,
  z = [k_1; …; k_S]ᵀ·k_basis (`[Hkv/S, S·d, S·r]`), written as the group's S
  cache slots of r; q̃_h = q_hᵀ·q_basis (`[Hkv, d, S·r]`). The layer passes
  `key_share=S` to the backend, which scores each query head against its
  group's concatenated slots. vLLM's `Attention` views the S·r-wide query as
  S rows of r per token; the backend views it back (`ThinKVImpl.forward`).

Either way the layer hands q [T, H·r], k [T, Hkv·r], v [T, Hkv·d] to vLLM's
`Attention(head_size=r, head_size_v=d)` with the original scale, so the
KV cache holds r + d values per token and KV head. The backend is always
thinkv (the class the model checked for its deployment, `backend.deployment`):
a thin model on any other backend would compute garbage.

Family differences handled here: Qwen2 has q/k/v biases (its config has no
`attention_bias` flag); Qwen3 and Gemma 3 RMS-normalise each q/k head before
RoPE (only the projection forms can follow that, which `thinkv compress`
enforces); Gemma 3 also scales by query_pre_attn_scalar**-0.5 and has one RoPE
per layer type. A layer typed "sliding_attention" (Gemma 3, Llama-family configs
with `layer_types`) attends over `config.sliding_window`, as in vLLM's models.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from vllm_thinkv.backend.backend import ThinKVBackend
from vllm_thinkv.config import ThinKVConfig, check_tensor_parallel
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.capture import rotate_half


class ThinKVAttention(nn.Module):
    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config=None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config=None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
        *,
        thin: ThinKVConfig,
        backend: type[ThinKVBackend],
    ) -> None:
        super().__init__()
        model_type = getattr(config, "model_type", "")
        layer = extract_layer_index(prefix)
        layer_type = (getattr(config, "layer_types", None) or [None] * (layer + 1))[layer]
        # vLLM's own rule (Llama, Gemma 3): a layer typed "sliding_attention" attends over config.sliding_window
        sliding_window = config.sliding_window if layer_type == "sliding_attention" else None
        gemma = model_type == "gemma3_text"
        bias = bias or model_type == "qwen2"
        tp_size = get_tensor_model_parallel_world_size()
        check_tensor_parallel(num_kv_heads, tp_size, thin.share_group)
        self.form = thin.form
        self.share = share = thin.share_group
        self.head_dim = d = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.rank = r = thin.ranks[layer]
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = num_kv_heads // tp_size
        self.group = self.num_heads // self.num_kv_heads
        qk_size = r if self.form == "rope_subspace" else d
        self.qkv_proj = QKVParallelLinear(hidden_size=hidden_size, head_size=qk_size, total_num_heads=num_heads,
                                          total_num_kv_heads=num_kv_heads, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj", v_head_size=d)
        self.splits = [self.num_heads * qk_size, self.num_kv_heads * qk_size, self.num_kv_heads * d]
        self.o_proj = RowParallelLinear(input_size=num_heads * d, output_size=hidden_size, bias=bias_o_proj,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = self.k_norm = None
        if model_type == "qwen3" or gemma:
            if self.form == "rope_subspace":
                raise ThinKVError(f"{model_type} thin checkpoints must use a post-RoPE form (post_rope_projection or "
                                  "shared_projection): its per-head q/k norms sit before RoPE")
            norm = GemmaRMSNorm if gemma else RMSNorm  # Gemma scales by (1 + weight)
            self.q_norm = norm(d, eps=config.rms_norm_eps)
            self.k_norm = norm(d, eps=config.rms_norm_eps)
        if self.form == "rope_subspace":
            self.rope_inv_freq = self._kv_head_parameter((self.num_kv_heads, r // 2), torch.float32)
        else:
            rope_parameters = getattr(config, "rope_parameters", None)
            if gemma:  # one RoPE per layer type (local and global bases)
                rope_parameters = rope_parameters[layer_type]
            self.rotary_emb = get_rope(d, max_position=max_position_embeddings,
                                       rope_parameters=rope_parameters, is_neox_style=True)
            self.q_basis = self._kv_head_parameter((self.num_kv_heads, d, share * r), None)
            self.k_basis = self._kv_head_parameter((self.num_kv_heads // share, share * d, share * r), None)
        # extra impl arguments, for the backend alone: vLLM hands its impl the query/key head size only
        extra = {"value_head_size": d, **({"key_share": share} if share > 1 else {})}
        scale = config.query_pre_attn_scalar**-0.5 if gemma else d**-0.5  # the original model's
        self.attn = Attention(self.num_heads, r, scale, num_kv_heads=self.num_kv_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn", attn_type=attn_type,
                              per_layer_sliding_window=sliding_window, attn_backend=backend, head_size_v=d, **extra)

    def _kv_head_parameter(self, shape: tuple[int, ...], dtype: torch.dtype | None) -> nn.Parameter:
        """A per-KV-head tensor; each tensor-parallel rank loads its KV heads' rows."""
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        rank, n = get_tensor_model_parallel_rank(), shape[0]

        def weight_loader(p: nn.Parameter, loaded: torch.Tensor) -> None:
            p.data.copy_(loaded[rank * n: (rank + 1) * n])

        param.weight_loader = weight_loader
        return param

    def _thin_rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        t = positions.shape[0]
        angles = positions.float()[:, None, None] * self.rope_inv_freq[None]  # [T, Hkv, r/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        qf = q.float().view(t, self.num_kv_heads, self.group, self.rank)
        kf = k.float().view(t, self.num_kv_heads, self.rank)
        qf = qf * cos[:, :, None] + rotate_half(qf) * sin[:, :, None]
        kf = kf * cos + rotate_half(kf) * sin
        return qf.to(q.dtype).view(t, -1), kf.to(k.dtype).view(t, -1)

    def _project(self, q: torch.Tensor, k: torch.Tensor):
        """q [T, H·d], k [T, Hkv·d] -> q̃ [T, H·S·r], cached key slots [T, Hkv·r] (S = 1 unless shared)."""
        t, groups = q.shape[0], self.num_kv_heads // self.share
        q = torch.einsum("tkgd,kdr->tkgr", q.view(t, self.num_kv_heads, self.group, self.head_dim), self.q_basis)
        # a share group's S heads are adjacent: [T, Hkv/S, S·d] in, [T, Hkv/S, S·r] = its S slots of r out
        k = torch.einsum("tkd,kdr->tkr", k.view(t, groups, self.share * self.head_dim), self.k_basis)
        return q.reshape(t, -1), k.reshape(t, -1)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split(self.splits, dim=-1)
        if self.q_norm is not None:
            t = q.shape[0]
            q = self.q_norm(q.reshape(t * self.num_heads, self.head_dim)).view(t, -1)
            k = self.k_norm(k.reshape(t * self.num_kv_heads, self.head_dim)).view(t, -1)
        if self.form == "rope_subspace":
            q, k = self._thin_rope(positions, q, k)
        else:
            q, k = self._project(*self.rotary_emb(positions, q, k))
        output, _ = self.o_proj(self.attn(q, k, v))
        return output
