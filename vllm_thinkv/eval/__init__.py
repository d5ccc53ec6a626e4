"""Quality evaluation of (thin-key) checkpoints: perplexity and passkey retrieval.

Prompt construction and scoring are separate from running, so the vLLM side
(SnapKV work) reuses the same prompts.
"""
