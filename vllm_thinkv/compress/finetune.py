"""QK fine-tuning of a thin model: only the q/k side trains, everything else stays bit-identical.

Trainable: thin q_proj/k_proj weights and biases (rope_subspace form), or the
q_basis/k_basis projections and (unless `bases_only`) the full-d q_proj/k_proj
feeding them (post_rope_projection form; the checkpoint stores those anyway).
Two objectives,
both distillation from the original model:

* ``local`` (default): layer by layer, the thin attention block's output
  (after o_proj, i.e. its contribution to the residual stream) is fitted to the
  original block's output on the same inputs, by normalised MSE. Each layer
  needs one attention forward/backward per step instead of a backward pass
  through the whole network, so on CPU it is several times cheaper per step and
  every layer gets its own direct signal. Inputs are the student's own residual
  stream (`inputs="student"`, layers are fitted in order and later layers learn
  to absorb earlier layers' residual error) or the teacher's (`"teacher"`).
* ``kl``: KL(original ‖ thin) of the next-token distributions, end to end (what
  a GPU run with more data should use; it optimises what PPL measures).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.thin_attention import ThinKVAttention

log = logging.getLogger(__name__)

OBJECTIVES = ("local", "kl")


# The measured recipe (benchmarks/results/quality.md): 8 training windows of 2048
# tokens, cycled through, 128 steps per layer (joint r = 32 calibrated at 4096:
# +3.5% PPL, +3-7% at every 512 positions up to 4096, passkey 90% at ~2k).
# Until issue 18 it was 32 windows of 512 and 512 steps (the same tokens); longer
# windows train the thin q·k at the positions it will serve.
DEFAULT_CTX = 2048
DEFAULT_WINDOWS = 8


@dataclass(frozen=True)
class FinetuneConfig:
    """`steps`: optimiser steps per layer (local) or in total (kl), one window each.
    `lr`: Adam step size relative to each tensor's RMS at the start (one knob
    that suits weights and bases alike), cosine-decayed to 0.
    `bases_only`: post-RoPE forms (post_rope_projection, shared_projection): train q_basis/k_basis but not q_proj/k_proj.
    Defaults are the recipe measured on SmolLM2 (local, 128 steps of 2048 tokens, lr 1e-2)."""

    objective: str = "local"
    steps: int = 128
    lr: float = 1e-2
    inputs: str = "student"
    bases_only: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ThinKVError(f"unknown fine-tuning objective {self.objective!r}; supported: {', '.join(OBJECTIVES)}")
        if self.inputs not in ("student", "teacher"):
            raise ThinKVError(f"inputs must be 'student' or 'teacher', got {self.inputs!r}")
        if self.steps < 1 or not self.lr > 0:
            raise ThinKVError(f"steps ({self.steps}) must be >= 1 and lr ({self.lr}) > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def qk_parameters(attn: ThinKVAttention, bases_only: bool = False) -> list[nn.Parameter]:
    """The tensors fine-tuning may change in one thin attention module."""
    bases = [attn.q_basis, attn.k_basis] if attn.form != "rope_subspace" else []
    if bases and bases_only:
        return bases
    return [p for m in (attn.q_proj, attn.k_proj) for p in (m.weight, m.bias) if p is not None] + bases


def _thin_modules(model: nn.Module) -> list[ThinKVAttention]:
    mods = [layer.self_attn for layer in model.model.layers]
    if not all(isinstance(m, ThinKVAttention) for m in mods):
        raise ThinKVError("fine-tuning needs a thin-key model (compress it first)")
    return mods


def _optimizer(params: list[nn.Parameter], cfg: FinetuneConfig, total: int):
    groups = [{"params": [p], "lr": cfg.lr * float(p.detach().pow(2).mean().sqrt().clamp(min=1e-8))} for p in params]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def loss_curve(losses: list[float], points: int = 32) -> list[list[float]]:
    """Training losses (one per step) -> at most `points` [first step, mean loss] buckets."""
    size = max(1, math.ceil(len(losses) / points))
    return [[i, sum(losses[i : i + size]) / len(losses[i : i + size])] for i in range(0, len(losses), size)]


def _freeze_all_but_qk(model: nn.Module, bases_only: bool) -> list[nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for attn in _thin_modules(model) for p in qk_parameters(attn, bases_only)]
    for p in params:
        p.requires_grad_(True)
    return params


def _causal_mask(t: int, dtype: torch.dtype, device, window: int | None = None) -> torch.Tensor:
    """Additive causal mask; with `window` W, query t sees keys t - W < p <= t (a sliding-window layer)."""
    mask = torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu(1)
    if window is not None:
        mask = mask + torch.full_like(mask, float("-inf")).tril(-window)
    return mask[None, None]


def _layer_kwargs(model: nn.Module, h: torch.Tensor, pos: torch.Tensor) -> list[dict]:
    """Each decoder layer's attention inputs: RoPE and mask by layer type (Gemma 3: its sliding layers attend
    over `config.sliding_window` tokens and have their own RoPE base; other models: one causal type)."""
    layers = len(model.model.layers)
    types = list(getattr(model.config, "layer_types", None) or ["full_attention"] * layers)
    rotary = model.model.rotary_emb
    per_type_rope = "layer_type" in inspect.signature(rotary.forward).parameters
    by_type = {}
    for lt in dict.fromkeys(types):
        window = model.config.sliding_window if lt == "sliding_attention" else None
        rope = rotary(h[:1], pos, lt) if per_type_rope else rotary(h[:1], pos)
        by_type[lt] = dict(position_embeddings=rope, attention_mask=_causal_mask(h.shape[1], h.dtype, h.device, window),
                           position_ids=pos)
    return [by_type[lt] for lt in types]


def finetune(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig, progress: bool = True
) -> dict:
    """Fine-tune `student` (thin) in place towards `teacher` (original) on token windows [N, T].
    Returns a log with the objective before and after (per layer for `local`) and
    the training-loss `curve` ([first step, mean loss] buckets; for `local`, step
    i's loss averaged over the layers, each layer normalised as its objective)."""
    _thin_modules(student)
    if len(student.model.layers) != len(teacher.model.layers):
        raise ThinKVError("student and teacher have different numbers of layers")
    student.train(False)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        if cfg.objective == "kl":
            return _finetune_kl(student, teacher, windows, cfg, progress)
        return _finetune_local(student, teacher, windows, cfg, progress)
    finally:
        for p in student.parameters():
            p.requires_grad_(False)
        if hasattr(student.config, "thinkv"):
            student.config.thinkv = {**student.config.thinkv, "finetuned": True}


def _finetune_local(student, teacher, windows, cfg: FinetuneConfig, progress: bool) -> dict:
    device = next(student.parameters()).device
    windows = windows.to(device)
    n, t = windows.shape
    pos = torch.arange(t, device=device)[None]
    with torch.no_grad():
        h_teacher = teacher.model.embed_tokens(windows)  # [N, T, hidden]
        h_student = h_teacher.clone()
        layer_kwargs = _layer_kwargs(teacher, h_teacher, pos)
    _freeze_all_but_qk(student, cfg.bases_only)
    layers = []
    bar = tqdm(total=len(student.model.layers) * cfg.steps, desc="fine-tuning (local)", unit="step", disable=not progress)
    for idx, (t_layer, s_layer, kw) in enumerate(zip(teacher.model.layers, student.model.layers, layer_kwargs)):
        with torch.no_grad():
            x_t = t_layer.input_layernorm(h_teacher)
            target = torch.cat([t_layer.self_attn(hidden_states=x_t[i : i + 1], **kw)[0] for i in range(n)])
            x_s = s_layer.input_layernorm(h_student if cfg.inputs == "student" else h_teacher)
            scale = target.pow(2).mean(dim=(1, 2))  # per window
        attn = s_layer.self_attn

        def loss_of(i: int) -> torch.Tensor:
            return F.mse_loss(attn(hidden_states=x_s[i : i + 1], **kw)[0], target[i : i + 1]) / scale[i]

        with torch.no_grad():
            before = float(sum(loss_of(i) for i in range(n)) / n)
        params = qk_parameters(attn, cfg.bases_only)
        opt, sched = _optimizer(params, cfg, cfg.steps)
        losses = []
        for step in range(cfg.steps):
            loss = loss_of(step % n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
        with torch.no_grad():
            after = float(sum(loss_of(i) for i in range(n)) / n)
            h_teacher = torch.cat([t_layer(h_teacher[i : i + 1], **kw) for i in range(n)])
            if cfg.inputs == "student":
                h_student = torch.cat([s_layer(h_student[i : i + 1], **kw) for i in range(n)])
        layers.append({"layer": idx, "before": before, "after": after, "curve": loss_curve(losses)})
        bar.set_postfix(layer=idx, before=f"{before:.4f}", after=f"{after:.4f}")
        log.debug("layer %d: attention-output NMSE %.5f -> %.5f", idx, before, after)
    bar.close()
    return {
        "objective": "local",
        "before": sum(x["before"] for x in layers) / len(layers),
        "after": sum(x["after"] for x in layers) / len(layers),
        "curve": [[c[0][0], sum(x[1] for x in c) / len(c)] for c in zip(*(x["curve"] for x in layers))],
        "layers": layers,
    }


def _kl(student, teacher, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
    s_logp = F.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1)
    return F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")


def _finetune_kl(student, teacher, windows, cfg: FinetuneConfig, progress: bool) -> dict:
    device = next(student.parameters()).device
    windows = windows.to(device)
    n = windows.shape[0]
    params = _freeze_all_but_qk(student, cfg.bases_only)
    with torch.no_grad():
        before = float(sum(_kl(student, teacher, windows[i : i + 1]) for i in range(n)) / n)
    opt, sched = _optimizer(params, cfg, cfg.steps)
    bar = tqdm(range(cfg.steps), desc="fine-tuning (kl)", unit="step", disable=not progress)
    losses = []
    for step in bar:
        loss = _kl(student, teacher, windows[step % n : step % n + 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    with torch.no_grad():
        after = float(sum(_kl(student, teacher, windows[i : i + 1]) for i in range(n)) / n)
    return {"objective": "kl", "before": before, "after": after, "curve": loss_curve(losses)}
