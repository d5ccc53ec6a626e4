"""Drive a running vLLM OpenAI server with the workload and read its Prometheus metrics.

Every prompt is sent at once as token ids to `/v1/completions` (streaming, greedy,
`ignore_eos`, `return_token_ids`), one thread per request; each streamed chunk's
arrival time stamps its tokens. `/metrics` is polled meanwhile for running and
waiting requests and KV usage (the peak is therefore sampled, every `poll_s`);
preemptions are the change in `vllm:num_preemptions_total`; the KV cache size
comes from `vllm:cache_config_info` (num_gpu_blocks × block_size).
Standard library only, so it runs wherever the script does.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vllm_thinkv.errors import ThinKVError

Sample = tuple[str, dict[str, str], float]


def parse_prometheus(text: str) -> list[Sample]:
    """(name, labels, value) for every sample line of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in _split_labels(rest.rstrip("}")):
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"')
        try:
            samples.append((name.strip(), labels, float(value)))
        except ValueError:
            continue
    return samples


def _split_labels(s: str) -> list[str]:
    """Split `a="x",b="y,z"` on commas outside quotes."""
    parts, cur, quoted = [], "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def metric(samples: list[Sample], *names: str) -> float | None:
    """Sum over label sets (engines) of the first of `names` that is present."""
    for name in names:
        values = [v for n, _, v in samples if n == name]
        if values:
            return sum(values)
    return None


def _get(url: str, timeout: float = 10) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError as e:
        raise ThinKVError(f"cannot reach the server at {url}: {e}") from None


def served_model(url: str) -> str:
    models = json.loads(_get(url + "/v1/models"))["data"]
    if not models:
        raise ThinKVError(f"the server at {url} serves no model")
    return models[0]["id"]


def _stream(url: str, model: str, prompt: list[int], output_tokens: int, start: float) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    sent = time.perf_counter() - start
    token_ids: list[int] = []
    times: list[float] = []
    try:
        r = urllib.request.urlopen(req, timeout=3600)
    except urllib.error.HTTPError as e:
        raise ThinKVError(f"{url}/v1/completions answered {e.code}: {e.read().decode(errors='replace')[:300]}") from None
    with r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            now = time.perf_counter() - start
            choices = json.loads(line[5:]).get("choices") or []
            if not choices:
                continue
            ids = choices[0].get("token_ids")
            n = len(ids) if ids is not None else int(bool(choices[0].get("text")))
            token_ids.extend(ids or [])
            times.extend([now] * n)
    return {"sent": sent, "token_ids": token_ids if len(token_ids) == len(times) else [], "token_times": times}


def run(url: str, prompts: list[list[int]], output_tokens: int, model: str | None = None,
        poll_s: float = 0.1) -> dict[str, Any]:
    """The workload against `url`; returns the raw record `summary.summarize` reads."""
    url = url.rstrip("/")
    model = model or served_model(url)
    before = parse_prometheus(_get(url + "/metrics"))
    info = [labels for name, labels, _ in before if name == "vllm:cache_config_info"]
    timeline: list[dict[str, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def poll() -> None:
        while not done.is_set():
            s = parse_prometheus(_get(url + "/metrics"))
            timeline.append({"t": time.perf_counter() - start,
                             "running": metric(s, "vllm:num_requests_running") or 0,
                             "waiting": metric(s, "vllm:num_requests_waiting") or 0,
                             "kv_usage": metric(s, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")})
            done.wait(poll_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            requests = list(pool.map(lambda p: _stream(url, model, p, output_tokens, start), prompts))
    finally:
        done.set()
        poller.join()
    after = parse_prometheus(_get(url + "/metrics"))
    preempt = [metric(s, "vllm:num_preemptions_total", "vllm:num_preemptions") for s in (before, after)]
    try:
        version = json.loads(_get(url + "/version")).get("version")
    except (ThinKVError, ValueError):
        version = None
    return {
        "vllm_version": version,
        "server": url,
        "model": model,
        "num_gpu_blocks": int(info[0]["num_gpu_blocks"]) if info and info[0].get("num_gpu_blocks") not in (None, "None") else None,
        "block_size": int(info[0]["block_size"]) if info and info[0].get("block_size") else None,
        "timeline": timeline,
        "preemptions": None if None in preempt else int(preempt[1] - preempt[0]),
        "requests": requests,
    }
