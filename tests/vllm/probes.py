"""Functions the tests run inside a vLLM worker with `LLM.apply_model` (they
must live in an importable module, not in `__main__`)."""


def attention_classes(model) -> list[str]:
    """Which attention impl class each attention layer of the worker's model uses."""
    from vllm.model_executor.layers.attention import Attention

    return sorted(
        {f"{type(m.impl).__module__}.{type(m.impl).__qualname__}" for m in model.modules() if isinstance(m, Attention)}
    )


def attention_ops(model) -> list[str]:
    """Which ops (`backend.ops.AttentionOps.name`) the worker's thinkv attention layers run."""
    from vllm.model_executor.layers.attention import Attention

    return sorted({m.impl.ops.name for m in model.modules() if isinstance(m, Attention) and hasattr(m.impl, "ops")})


def snapkv_selections(model) -> list[list[tuple[int, list[list[int]]]]]:
    """Per attention layer, in model order: its recent SnapKV selections, oldest
    first, each (prompt length, kept token indices [Hkv][budget])."""
    from vllm.model_executor.layers.attention import Attention

    return [
        [(p, idx.cpu().tolist()) for p, idx in m.impl.snapkv_layer.recent_selections]
        for m in model.modules()
        if isinstance(m, Attention)
    ]


def compilation(model) -> list[tuple[str, bool]]:
    """(class, compiled) of each module vLLM compiles (`support_torch_compile`): True once the
    engine has run its torch.compile'd forward, False for an eager (`enforce_eager`) model."""
    return sorted({(type(m).__qualname__, bool(m.compiled) and not m.do_not_compile)
                   for m in model.modules() if hasattr(m, "do_not_compile") and hasattr(m, "compiled")})
