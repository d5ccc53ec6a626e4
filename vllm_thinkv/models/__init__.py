"""vLLM model classes for thin-key checkpoints (registered by the plugin).

A thin checkpoint (`thinkv compress`) names `ThinKV<Orig>ForCausalLM` in its
config.json; `ThinKVForCausalLM` builds vLLM's Llama model (`ThinKVGemma3ForCausalLM`
its Gemma 3 model) with each attention
layer replaced by `ThinKVAttention`, which caches r-dim keys and d-dim values
and always runs on the thinkv backend.
"""

from vllm_thinkv.config import ARCHITECTURES

# thin architecture name -> "module:Class" (lazy: registering imports nothing heavy)
MODEL_CLASSES = {thin: "vllm_thinkv.models.llama_family:ThinKVForCausalLM" for thin in ARCHITECTURES.values()}
MODEL_CLASSES["ThinKVGemma3ForCausalLM"] = "vllm_thinkv.models.gemma3:ThinKVGemma3ForCausalLM"
