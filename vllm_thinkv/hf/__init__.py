"""Hugging Face (transformers) side of vllm-thinkv: the reference models."""
