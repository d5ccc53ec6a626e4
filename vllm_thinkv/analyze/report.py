"""Headline numbers, provenance and `summary.md`, all derived from the result dict
(`analysis.json` is written with `vllm_thinkv.results.write_json`)."""

from __future__ import annotations

import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from vllm_thinkv.analyze.config import KINDS, KV_KINDS, WEIGHTS
from vllm_thinkv.results import device_label, package_version

DEFINITIONS = {
    "effective_rank": "smallest r with sum_{i<=r} s_i^2 >= p * sum_i s_i^2 (s: singular values), for energy p",
    "activation_spectra": "singular values of the uncentred activation matrix [tokens, d] of one head over all "
    "windows, reported as s_i / sqrt(tokens); 'centred' subtracts the per-head mean first",
    "weight_spectra": "singular values of a head's rows h*d:(h+1)*d of q_proj/k_proj/v_proj (bias and Qwen3 q/k "
    "norms are not part of the weight)",
    "queries": "per query head; the thin-key fit pools a KV head's group",
    "adjacent_cosine": "mean cosine similarity of a head's vectors at positions t and t+offset within a window",
    "r2": "R^2 = 1 - SSE/SST over all d dims of the target head on held-out windows; SST about the held-out mean; "
    "least squares with an intercept fitted on the calibration windows; references chosen greedily by "
    "calibration R^2; k <= min(max_refs, heads - 1)",
    "logit_error": "sum (q.k - q~.k~)^2 / sum (q.k)^2 over causal pairs (t, s <= t) of held-out windows, for "
    "logit_queries evenly spaced query positions t per window (logit_windows evenly spaced held-out windows) "
    "and the query heads of each KV head's group, "
    "post-RoPE; methods fitted on the calibration windows",
    "rank_at_error": "smallest tried rank r (multiples of rank_step, then d) with logit_error <= target",
}


def _flat(nested) -> list[float]:
    if isinstance(nested, list):
        return [x for item in nested for x in _flat(item)]
    return [] if nested is None else [float(nested)]


def _mean(nested) -> float | None:
    xs = _flat(nested)
    return statistics.fmean(xs) if xs else None


def headline(result: dict) -> dict:
    """Means over layers and heads of every measurement, plus the ranks to choose."""
    energies = list(result["activations"]["k_pre"]["effective_rank"])
    act = result["activations"]
    h: dict = {
        "effective_rank": {k: {p: _mean(act[k]["effective_rank"][p]) for p in energies} for k in KINDS},
        "effective_rank_centred": {k: {p: _mean(act[k]["effective_rank_centred"][p]) for p in energies} for k in KINDS},
        "weight_effective_rank": {w: {p: _mean(result["weights"][w]["effective_rank"][p]) for p in energies} for w in WEIGHTS},
    }
    h["key_to_value_rank_ratio"] = {
        k: {p: h["effective_rank"][k][p] / h["effective_rank"]["v"][p] if h["effective_rank"]["v"][p] else None for p in energies}
        for k in ("k_pre", "k_rope")
    }
    types = result["model"].get("layer_types") or []
    if len(set(types)) > 1:  # a hybrid model (Gemma 3): the same means per layer type (sliding vs full attention)
        h["effective_rank_by_layer_type"] = {
            t: {k: {p: _mean([layer for layer, lt in zip(act[k]["effective_rank"][p], types) if lt == t])
                    for p in energies} for k in KINDS}
            for t in dict.fromkeys(types)
        }
    pred = result["predictability"]
    h["r2_heldout"] = {
        kind: {str(k): _mean([[head[i] for head in layer] for layer in p["r2_heldout"]]) for i, k in enumerate(p["k"])}
        for kind, p in pred.items()
    }
    adj = result["adjacent_cosine"]
    h["adjacent_cosine"] = {
        kind: {str(o): _mean([[head[i] for head in layer] for layer in adj[kind]]) for i, o in enumerate(adj["offsets"])}
        for kind in KINDS
    }
    le = result["logit_error"]
    h["rank_at_error"] = {}
    for method, res in le["methods"].items():
        h["rank_at_error"][method] = {}
        for t, per in res["rank_at_error"].items():
            heads = [int(x) for x in _flat(per)]
            missing = len([x for layer in per for x in layer if x is None])
            h["rank_at_error"][method][t] = {
                "uniform": None if missing else max(heads),
                "per_layer_max": [None if None in layer else max(layer) for layer in per],
                "mean_per_head": statistics.fmean(heads) if heads else None,
                "median_per_head": statistics.median(heads) if heads else None,
                "heads_not_reached": missing,
            }
    return h


def provenance(command: str, device: str) -> dict:
    """Date, exact command, versions and hardware: what a reader needs to reproduce a result."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": {
            "python": platform.python_version(),
            **{p: package_version(p) for p in ("vllm-thinkv", "torch", "transformers", "matplotlib")},
        },
        "hardware": {"device": device, "name": device_label(device), "torch_threads": torch.get_num_threads()},
    }


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def summary_markdown(result: dict, plots: list[str]) -> str:
    """The human-readable report: provenance, headline tables, per-layer table, definitions."""
    m, h, meta, text = result["model"], result["headline"], result["meta"], result["text"]
    energies = list(h["effective_rank"]["k_pre"])
    lines = [
        f"# thinkv analyze: `{Path(m['path']).name}`",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- hardware: {meta['hardware']['name']} ({meta['hardware']['device']}, {meta['hardware']['torch_threads']} "
        f"threads), dtype {result['settings']['dtype']}; total {result['timings_s']['total']:.0f} s",
        f"- model: {m['model_type']}, {m['num_layers']} layers, {m['num_heads']} query / {m['num_kv_heads']} KV heads, "
        f"d = {m['head_dim']}",
        f"- text: {text['tokens']} tokens from {', '.join(text['texts'])} (skipping {text['skip_chars']} characters "
        f"of each file) in windows of {text['ctx']}: {text['windows_fit']} calibration, "
        f"{text['windows_heldout']} held out",
        "",
        "## Effective rank (energy), mean over layers and heads",
        "",
        "| | " + " | ".join(f"{float(p):.0%}" for p in energies) + " | " + " | ".join(
            f"centred {float(p):.0%}" for p in energies
        ) + " |",
        "|---" * (1 + 2 * len(energies)) + "|",
    ]
    for k, desc in KINDS.items():
        lines.append(
            f"| {desc} | "
            + " | ".join(_fmt(h["effective_rank"][k][p], 1) for p in energies)
            + " | "
            + " | ".join(_fmt(h["effective_rank_centred"][k][p], 1) for p in energies)
            + " |"
        )
    for w in ("k_proj", "v_proj", "q_proj"):
        lines.append(
            f"| `{w}` weight | " + " | ".join(_fmt(h["weight_effective_rank"][w][p], 1) for p in energies)
            + " |" + " |" * len(energies)
        )
    lines += ["", "Keys / values effective-rank ratio: " + "; ".join(
        f"{k}: " + ", ".join(f"{float(p):.0%} {_fmt(v)}" for p, v in r.items())
        for k, r in h["key_to_value_rank_ratio"].items()
    ), ""]
    if "effective_rank_by_layer_type" in h:
        types = result["model"]["layer_types"]
        lines += ["## Effective rank by layer type (energy), mean over the type's layers and heads", ""]
        lines += ["| layer type | layers | | " + " | ".join(f"{float(p):.0%}" for p in energies) + " |",
                  "|---" * (3 + len(energies)) + "|"]
        for t, per_kind in h["effective_rank_by_layer_type"].items():
            for k in ("k_pre", "k_rope", "v"):
                lines.append(f"| {t} | {types.count(t)} | {KINDS[k]} | "
                             + " | ".join(_fmt(per_kind[k][p], 1) for p in energies) + " |")
        lines.append("")

    lines += ["## Inter-head linear predictability (held-out R², mean over layers and heads)", ""]
    k_all = max(len(v) for v in h["r2_heldout"].values())
    lines += ["| | " + " | ".join(f"k = {k}" for k in range(1, k_all + 1)) + " |", "|---" * (1 + k_all) + "|"]
    for kind, per_k in h["r2_heldout"].items():
        cells = [_fmt(per_k.get(str(k)), 3) for k in range(1, k_all + 1)]
        lines.append(f"| {KINDS[kind]} | " + " | ".join(cells) + " |")

    offsets = result["adjacent_cosine"]["offsets"]
    lines += ["", "## Cosine similarity of tokens `offset` apart (mean over layers and heads)", ""]
    lines += ["| | " + " | ".join(f"offset {o}" for o in offsets) + " |", "|---" * (1 + len(offsets)) + "|"]
    for kind in KINDS:
        lines.append(f"| {KINDS[kind]} | " + " | ".join(_fmt(h["adjacent_cosine"][kind][str(o)], 3) for o in offsets) + " |")

    lines += ["", "## Thin-key rank for a held-out relative logit error", ""]
    lines += ["| method | error ≤ | uniform r (all layers, heads) | mean r per head | per-layer max r |", "|---|---|---|---|---|"]
    for method, per_t in h["rank_at_error"].items():
        for t, v in per_t.items():
            lines.append(
                f"| {method} | {float(t):.0%} | {_fmt(v['uniform'])} | {_fmt(v['mean_per_head'], 1)} | "
                + " ".join(_fmt(x) for x in v["per_layer_max"]) + " |"
            )
    lines += ["", *_per_layer_table(result), "", "## Definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _per_layer_table(result: dict) -> list[str]:
    mid = list(result["activations"]["k_pre"]["effective_rank"])[len(result["settings"]["energies"]) // 2]
    act, pred, adj, le = result["activations"], result["predictability"], result["adjacent_cosine"], result["logit_error"]
    methods = list(le["methods"])
    target = f"{sorted(result['settings']['logit_errors'])[len(result['settings']['logit_errors']) // 2]:g}"
    lines = [
        f"## Per layer (means over heads; effective rank at {float(mid):.0%}; R² with the most references; "
        f"r: rank for {float(target):.0%} logit error, max over KV heads)",
        "",
        "| layer | rank k pre | rank k post | rank v | rank q post | R² k pre | R² k post | R² v | cos k pre | "
        "cos k post | cos v | " + " | ".join(f"r {m}" for m in methods) + " |",
        "|---" * (11 + len(methods)) + "|",
    ]
    for layer in range(result["model"]["num_layers"]):
        cells = [_fmt(_mean(act[k]["effective_rank"][mid][layer]), 1) for k in ("k_pre", "k_rope", "v", "q_rope")]
        cells += [_fmt(_mean([hd[-1] if hd else None for hd in pred[k]["r2_heldout"][layer]]), 3) for k in KV_KINDS]
        cells += [_fmt(_mean([hd[0] for hd in adj[k][layer]]), 3) for k in KV_KINDS]
        for m in methods:
            per = le["methods"][m]["rank_at_error"][target][layer]
            cells.append(_fmt(None if None in per else max(per)))
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines
