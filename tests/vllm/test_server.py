"""`thinkv serve` answers the OpenAI endpoints over HTTP with the thinkv backend."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.vllm.engine import BASE_ENV
from vllm_thinkv.serve.process import ServerProcess

SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--block-size", "32", "--enforce-eager",
              "--max-num-seqs", "16", "--served-model-name", "tiny"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    srv = ServerProcess(tiny_llama_dir, SERVE_ARGS, env=BASE_ENV, log=tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def complete(server, prompt: str, **extra) -> str:
    r = requests.post(server.url + "/v1/completions",
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, **extra}, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def stream_text(server, path: str, body: dict) -> str:
    """Concatenate the deltas of a server-sent-events stream."""
    parts = []
    with requests.post(server.url + path, json={**body, "stream": True}, stream=True, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def test_completions_plain_and_streaming(server):
    text = complete(server, "It is a truth universally acknowledged")
    assert text
    body = {"model": "tiny", "prompt": "It is a truth universally acknowledged", "max_tokens": 16, "temperature": 0}
    assert stream_text(server, "/v1/completions", body) == text


def test_chat_completions_plain_and_streaming(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Emma?"}], "max_tokens": 16,
            "temperature": 0}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    text = r.json()["choices"][0]["message"]["content"]
    assert text
    assert stream_text(server, "/v1/chat/completions", body) == text


def test_sixteen_concurrent_requests_match_sequential(server):
    prompts = [f"Chapter {i}. Emma Woodhouse, handsome, clever, and rich, " + "and so on " * i for i in range(16)]
    sequential = [complete(server, p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda p: complete(server, p), prompts))
    assert concurrent == sequential
