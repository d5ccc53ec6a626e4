"""Figures drawn from the result dict alone (so they can be redrawn from analysis.json).

Uses matplotlib's object API (`Figure`), never pyplot: no global state, no GUI backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vllm_thinkv.analyze.config import KINDS, KV_KINDS

STYLE = {
    "k_pre": dict(color="tab:blue", ls="-", label="keys, pre-RoPE"),
    "k_rope": dict(color="tab:purple", ls="-", label="keys, post-RoPE (cached)"),
    "v": dict(color="tab:orange", ls="-", label="values"),
    "q_pre": dict(color="tab:olive", ls="-", label="queries, pre-RoPE"),
    "q_rope": dict(color="tab:green", ls="-", label="queries, post-RoPE"),
    "k_proj": dict(color="tab:blue", ls="-", label="k_proj"),
    "v_proj": dict(color="tab:orange", ls="-", label="v_proj"),
    "q_proj": dict(color="tab:green", ls="-", label="q_proj"),
}
METHOD_COLORS = ["tab:red", "tab:cyan", "tab:brown", "tab:pink", "tab:gray"]


def _arr(nested) -> np.ndarray:
    """Nested lists (None for missing) -> float array with NaN."""
    return np.array(nested, dtype=float)


def _mid_energy(result: dict) -> str:
    energies = list(result["activations"]["k_pre"]["effective_rank"])
    return energies[len(energies) // 2]


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 6)
    return math.ceil(n / cols), cols


def _energy_fractions(sv_layer: list[list[float]]) -> np.ndarray:
    """Mean over heads of s_i^2 / sum s^2."""
    e = _arr(sv_layer) ** 2
    return np.nanmean(e / np.maximum(e.sum(-1, keepdims=True), 1e-300), axis=0)


def _spectra_grid(result: dict, source: dict, names: tuple[str, ...], title: str) -> Figure:
    n = result["model"]["num_layers"]
    rows, cols = _grid(n)
    fig = Figure(figsize=(2.6 * cols, 2.1 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()
    for layer, ax in enumerate(axes):
        if layer >= n:
            ax.set_visible(False)
            continue
        for name in names:
            key = "rms_singular_values" if "rms_singular_values" in source[name] else "singular_values"
            frac = _energy_fractions(source[name][key][layer])
            ax.semilogy(np.arange(1, len(frac) + 1), np.maximum(frac, 1e-8), **STYLE[name], lw=1.2)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylim(1e-6, 1.0)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.supxlabel("component i", fontsize=9)
    fig.supylabel("energy fraction s_i² / Σ s² (mean over heads)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def panel_rank_by_layer(ax, result: dict, kinds=("k_pre", "k_rope", "v", "q_rope")) -> None:
    p = _mid_energy(result)
    for kind in kinds:
        ranks = _arr(result["activations"][kind]["effective_rank"][p])
        ax.plot(np.nanmean(ranks, axis=1), marker=".", **STYLE[kind])
    ax.set_ylim(0, result["model"]["head_dim"] + 1)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"effective rank at {float(p):.0%} energy")
    ax.set_title("Effective rank (mean over heads)", fontsize=10)
    ax.legend(fontsize=7)


def panel_r2_vs_k(ax, result: dict, kinds: tuple[str, ...], title: str) -> None:
    for kind in kinds:
        p = result["predictability"][kind]
        if not p["k"]:
            continue
        r2 = _arr(p["r2_heldout"]).reshape(-1, len(p["k"]))
        ax.plot(p["k"], np.nanmean(r2, axis=0), marker="o", **STYLE[kind])
        lo, hi = np.nanpercentile(r2, 10, axis=0), np.nanpercentile(r2, 90, axis=0)
        ax.fill_between(p["k"], lo, hi, color=STYLE[kind]["color"], alpha=0.15)
    ax.set_xticks(range(1, max([len(result["predictability"][k]["k"]) for k in kinds] + [1]) + 1))
    ax.set_xlabel("reference heads k (greedy)")
    ax.set_ylabel("held-out R² (mean; band 10–90%)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    ax.set_title(title, fontsize=10)
    if any(result["predictability"][k]["k"] for k in kinds):
        ax.legend(fontsize=7)
    else:  # e.g. MQA (Gemma-3-270m): one KV head per layer, no peer head to predict it from
        ax.text(0.5, 0.5, "no peer heads to predict from", ha="center", va="center", transform=ax.transAxes)


def panel_adjacent(ax, result: dict, kinds=KV_KINDS) -> None:
    adj = result["adjacent_cosine"]
    far = max(i for i, o in enumerate(adj["offsets"]) if o < result["settings"]["ctx"])
    for kind in kinds:
        cos = _arr(adj[kind])  # [L, H, offsets]
        ax.plot(np.nanmean(cos[:, :, 0], axis=1), marker=".", **STYLE[kind])
        ax.plot(np.nanmean(cos[:, :, far], axis=1), color=STYLE[kind]["color"], ls=":", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title(f"Adjacent tokens (solid) vs {adj['offsets'][far]} apart (dotted)", fontsize=10)
    ax.legend(fontsize=7)


def panel_cosine_vs_offset(ax, result: dict) -> None:
    adj = result["adjacent_cosine"]
    keep = [i for i, o in enumerate(adj["offsets"]) if o < result["settings"]["ctx"]]
    for kind in KINDS:
        cos = _arr(adj[kind])[:, :, keep]
        ax.semilogx([adj["offsets"][i] for i in keep], np.nanmean(cos, axis=(0, 1)), marker="o", **STYLE[kind])
    ax.set_xlabel("token offset")
    ax.set_ylabel("mean cosine similarity (all layers, heads)")
    ax.set_title("Similarity vs distance", fontsize=10)
    ax.legend(fontsize=7)


def panel_rank_at_error(ax, result: dict, targets: list[str] | None = None, methods: list[str] | None = None) -> None:
    """Per layer, the rank each method needs for each error target (default: all methods, all targets)."""
    le = result["logit_error"]
    d = result["model"]["head_dim"]
    for i, (method, res) in enumerate(le["methods"].items()):
        if methods is not None and method not in methods:
            continue
        chosen = [(t, per) for t, per in res["rank_at_error"].items() if targets is None or t in targets]
        for j, (t, per) in enumerate(chosen):
            worst = [np.nan if None in layer else max(layer) for layer in per]
            ax.plot(worst, marker=".", color=METHOD_COLORS[i % len(METHOD_COLORS)], ls=["-", "--", ":", "-."][j % 4],
                    label=f"{method}, error ≤ {float(t):.0%}")
    ax.set_ylim(0, d * 1.3)  # headroom for the legend
    ax.set_yticks(le["ranks"])
    ax.set_xlabel("layer")
    ax.set_ylabel("thin-key rank r (max over KV heads)")
    ax.set_title("Rank for a held-out logit error" + (f": {', '.join(methods)}" if methods else ""), fontsize=10)
    ax.legend(fontsize=6, ncols=2, loc="upper center")


def panel_error_vs_rank(ax, result: dict) -> None:
    le = result["logit_error"]
    for i, (method, res) in enumerate(le["methods"].items()):
        err = _arr(res["error"]).reshape(-1, len(le["ranks"]))
        ranks = np.array(le["ranks"])
        keep = ranks < result["model"]["head_dim"]  # r = d is exact for projections: log(0)
        c = METHOD_COLORS[i % len(METHOD_COLORS)]
        ax.semilogy(ranks[keep], np.nanmean(err[:, keep], axis=0), marker="o", color=c, label=f"{method} (mean)")
        lo, hi = np.nanpercentile(err[:, keep], 10, axis=0), np.nanpercentile(err[:, keep], 90, axis=0)
        ax.fill_between(ranks[keep], lo, hi, color=c, alpha=0.15)
    for t in le["targets"]:
        ax.axhline(t, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("thin-key rank r")
    ax.set_ylabel("held-out relative logit error (band: 10–90% of heads)")
    ax.set_title("Logit error vs rank", fontsize=10)
    ax.legend(fontsize=7)


def heatmaps(result: dict) -> Figure:
    p = _mid_energy(result)
    kinds = ("k_pre", "k_rope", "v", "q_rope")
    d = result["model"]["head_dim"]
    n = result["model"]["num_layers"]
    widths = [_arr(result["activations"][k]["effective_rank"][p]).shape[1] for k in kinds]
    fig = Figure(figsize=(2.0 + 0.45 * sum(widths) + 1.2 * len(kinds), 1.0 + 0.22 * n), layout="constrained")
    axes = fig.subplots(1, len(kinds), width_ratios=widths)
    for ax, kind in zip(axes, kinds):
        ranks = _arr(result["activations"][kind]["effective_rank"][p])
        im = ax.imshow(ranks, aspect="auto", vmin=0, vmax=d, cmap="viridis", interpolation="nearest")
        for (i, j), v in np.ndenumerate(ranks):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 * d else "k")
        ax.set_title(STYLE[kind]["label"], fontsize=9)
        ax.set_xlabel("query head" if kind.startswith("q") else "KV head", fontsize=8)
        ax.set_xticks(range(ranks.shape[1]))
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.6, label=f"effective rank at {float(p):.0%} energy")
    return fig


def _pair(draw_a, draw_b, size=(11, 4)) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    a, b = fig.subplots(1, 2)
    draw_a(a)
    draw_b(b)
    return fig


def logit_ranks(result: dict) -> Figure:
    """Error vs rank for every method, then one panel per method: rank per layer for each target."""
    methods = list(result["logit_error"]["methods"])
    rows = math.ceil((1 + len(methods)) / 2)
    fig = Figure(figsize=(11, 4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, 2)).ravel()
    panel_error_vs_rank(axes[0], result)
    for ax, method in zip(axes[1:], methods):
        panel_rank_at_error(ax, result, methods=[method])
    for ax in axes[1 + len(methods) :]:
        ax.set_visible(False)
    return fig


def overview(result: dict) -> Figure:
    """The four findings on one page: ranks, peer-head R², adjacent similarity, rank for a logit error."""
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    panel_rank_by_layer(a, result)
    panel_r2_vs_k(b, result, KV_KINDS, "Predicting a KV head from its peers")
    panel_adjacent(c, result)
    targets = list(next(iter(result["logit_error"]["methods"].values()), {}).get("rank_at_error", {}))
    panel_rank_at_error(d, result, targets[len(targets) // 2 : len(targets) // 2 + 1])
    fig.suptitle(f"thinkv analyze: {Path(result['model']['path']).name}", fontsize=11)
    return fig


def write_plots(result: dict, out: Path) -> list[str]:
    """Write every figure into `out`; return the file names."""
    m = result["model"]
    figures = {
        "overview.png": overview(result),
        "spectra_activations.png": _spectra_grid(
            result, result["activations"], ("k_pre", "k_rope", "v"), "Activation spectra per layer: keys vs values"
        ),
        "spectra_weights.png": _spectra_grid(
            result, result["weights"], ("k_proj", "v_proj", "q_proj"), "Projection-weight spectra per layer (per head)"
        ),
        "effective_rank.png": heatmaps(result),
        "r2_vs_k.png": _pair(
            lambda ax: panel_r2_vs_k(ax, result, KV_KINDS, f"KV heads ({m['num_kv_heads']} per layer)"),
            lambda ax: panel_r2_vs_k(ax, result, ("q_pre", "q_rope"), f"Query heads ({m['num_heads']} per layer)"),
        ),
        "adjacent_similarity.png": _pair(lambda ax: panel_adjacent(ax, result), lambda ax: panel_cosine_vs_offset(ax, result)),
        "logit_rank.png": logit_ranks(result),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    return list(figures)
