"""The server middleware that refuses per-request SnapKV budgets above `max_budget`
(`serve.budget_limit`), on a small app registered the way `vllm serve --middleware`
registers it (vLLM's own `init_entrypoints_middleware`), no engine: refusals are vLLM's
400 shape and never reach the app; everything else reaches it with its body intact."""

import asyncio
import json
from argparse import Namespace
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

from vllm_thinkv.serve.budget_limit import SnapKVBudgetLimit
from vllm_thinkv.serve.cli import BUDGET_MIDDLEWARE
from vllm_thinkv.snapkv.budgets import PROCESSOR

MAX = 128


def vllm_config(snapkv: dict | None, processors=(PROCESSOR,)):
    """What `deployment_settings` reads of vLLM's config."""
    hf_config = SimpleNamespace(**({"thinkv_snapkv": snapkv} if snapkv is not None else {}))
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config, logits_processors=list(processors)),
                           use_v2_model_runner=False)


def make_client(config) -> tuple[TestClient, list]:
    """An app whose routes record the body they got (streamed back in chunks on /v1/chat/completions)."""
    calls = []

    async def echo(request: Request):
        body = await request.body()
        calls.append((request.method, request.url.path, body))
        return JSONResponse({"echo": body.decode("latin-1")})

    async def stream(request: Request):
        body = await request.body()
        calls.append((request.method, request.url.path, body))

        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n".encode()
            yield b"data: " + body + b"\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", echo, methods=["GET", "POST"]),
                            Route("/v1/chat/completions", stream, methods=["POST"]),
                            Route("/tokenize", echo, methods=["POST"])])
    app.state.vllm_config = config
    args = Namespace(allowed_origins=["*"], allow_credentials=False, allowed_methods=["*"], allowed_headers=["*"],
                     api_key=None, enable_request_id_headers=False, middleware=[BUDGET_MIDDLEWARE])
    init_entrypoints_middleware(args, app, ())  # vLLM's own loader: module.Object -> app.add_middleware
    return TestClient(app), calls


def body(xargs=None, **extra) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 4, **extra,
                       **({"vllm_xargs": xargs} if xargs is not None else {})}).encode()


CAPPED = {"budget": 64, "window": 16, "max_budget": MAX}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("xargs, message", [
    ({"thinkv_snapkv_budget": 4000}, f"thinkv_snapkv_budget 4000 is above this deployment's max_budget ({MAX})"),
    ({"thinkv_snapkv_budget": MAX + 1}, f"thinkv_snapkv_budget {MAX + 1} is above this deployment's max_budget"),
    ({"thinkv_snapkv_budget": "off", "other_plugin": 1},
     f'thinkv_snapkv_budget "off" (no compaction) is above this deployment\'s max_budget ({MAX})'),
])
def test_above_the_maximum_is_vllms_400_and_never_reaches_the_app(path, xargs, message):
    client, calls = make_client(vllm_config(CAPPED))
    r = client.post(path, content=body(xargs, stream=True), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    # vLLM's ErrorResponse for a VLLMValidationError (what validate_params' 400s look like)
    assert error["message"].startswith("thinkv SnapKV: " + message) and "parameter=vllm_xargs" in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "vllm_xargs", 400)
    assert calls == []


@pytest.mark.parametrize("content", [
    body(),  # no xargs
    body({"thinkv_snapkv_budget": MAX}),  # at the maximum
    body({"thinkv_snapkv_budget": 8}),
    body({"thinkv_snapkv_budget_ratio": 0.99}),  # ratios are capped, never refused
    body({"other_plugin": "x"}),
    body({"thinkv_snapkv_budget": -5}),  # malformed: validate_params answers it
    body({"thinkv_snapkv_budget": 4000, "thinkv_snapkv_budget_ratio": 0.5}),  # ditto (both keys)
    body({"thinkv_snapkv_budget": 4000.0}),  # ditto (not an integer)
    b'{"vllm_xargs": {"thinkv_snapkv_budget": 4000}',  # not JSON: vLLM answers it
    b"\xff\xfe not utf-8",
    b'[{"vllm_xargs": {"thinkv_snapkv_budget": 4000}}]',  # not an object
    b'{"vllm_xargs": "thinkv_snapkv_budget=4000"}',
    b"",
])
def test_everything_else_reaches_the_app_with_its_body(content):
    client, calls = make_client(vllm_config(CAPPED))
    r = client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["echo"] == content.decode("latin-1")
    assert calls == [("POST", "/v1/completions", content)]


def test_streaming_responses_stream_through():
    client, calls = make_client(vllm_config(CAPPED))
    content = body({"thinkv_snapkv_budget": 32}, stream=True)
    with client.stream("POST", "/v1/chat/completions", content=content) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        received = b"".join(r.iter_bytes())
    assert received == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: " + content + b"\n\n"
    assert calls == [("POST", "/v1/chat/completions", content)]


def test_other_methods_and_routes_are_not_read():
    client, calls = make_client(vllm_config(CAPPED))
    over = body({"thinkv_snapkv_budget": 4000})
    assert client.post("/tokenize", content=over).status_code == 200
    assert client.request("GET", "/v1/completions", content=over).status_code == 200
    assert calls == [("POST", "/tokenize", over), ("GET", "/v1/completions", over)]


@pytest.mark.parametrize("config", [
    vllm_config({"budget": 64, "window": 16}),  # no max_budget: every budget is accepted
    vllm_config(CAPPED, processors=()),  # no per-request processor: the keys are ignored
    vllm_config(None),  # no SnapKV
])
def test_deployments_that_cap_nothing_refuse_nothing(config):
    client, calls = make_client(config)
    for xargs in ({"thinkv_snapkv_budget": 4000}, {"thinkv_snapkv_budget": "off"}):
        content = body(xargs)
        assert client.post("/v1/completions", content=content).status_code == 200
        assert calls[-1] == ("POST", "/v1/completions", content)


def test_an_app_without_vllms_config_is_left_alone():
    client, calls = make_client(None)
    assert client.post("/v1/completions", content=body({"thinkv_snapkv_budget": 4000})).status_code == 200
    assert len(calls) == 1


def test_a_body_in_pieces_is_replayed_whole_then_the_clients_messages_follow():
    """Pure ASGI, no client: the body arrives in three messages; the app gets it in one, then
    the client's own messages (vLLM waits on http.disconnect while it streams)."""
    content = body({"thinkv_snapkv_budget": 100})
    incoming = [{"type": "http.request", "body": content[:10], "more_body": True},
                {"type": "http.request", "body": content[10:20], "more_body": True},
                {"type": "http.request", "body": content[20:], "more_body": False},
                {"type": "http.disconnect"}]
    got = []

    async def app(scope, receive, send):
        got.extend([await receive(), await receive()])

    async def receive():
        return incoming.pop(0)

    async def send(message):
        raise AssertionError(f"the middleware answered {message}")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
             "app": SimpleNamespace(state=SimpleNamespace(vllm_config=vllm_config(CAPPED)))}
    asyncio.run(SnapKVBudgetLimit(app)(scope, receive, send))
    assert got == [{"type": "http.request", "body": content, "more_body": False}, {"type": "http.disconnect"}]


def test_a_client_gone_before_its_body_ends_reaches_nothing():
    incoming = [{"type": "http.request", "body": b'{"vllm_xargs"', "more_body": True}, {"type": "http.disconnect"}]

    async def app(scope, receive, send):
        raise AssertionError("the app was called")

    async def receive():
        return incoming.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
             "app": SimpleNamespace(state=SimpleNamespace(vllm_config=vllm_config(CAPPED)))}
    asyncio.run(SnapKVBudgetLimit(app)(scope, receive, None))
    assert incoming == []
