"""`SnapKVBudgetLimit`: an ASGI middleware for vLLM's OpenAI server that refuses,
with HTTP 400, a request whose own SnapKV budget (`vllm_xargs`) is above the
deployment's `max_budget` (or is `"off"` where `max_budget` is set).

Why a middleware: vLLM's admission hook for `extra_args`, the logits processor's
`validate_params`, is a classmethod called without the deployment's config
(`snapkv.requests`); the server's app holds that config (`app.state.vllm_config`,
set by vLLM's `init_app_state`), so this reads the request there, before vLLM
does. Installed with vLLM's own option (`thinkv serve` adds it when the
per-request processor is named):

    vllm serve ... --middleware vllm_thinkv.serve.budget_limit.SnapKVBudgetLimit

Everything else goes through untouched (the body replayed as it came): other
methods and routes, bodies that are not a JSON object, requests without
per-request keys, malformed values (the processor's `validate_params` answers
those with vLLM's own 400), ratios (capped by design: what one keeps depends on
the prompt's token count), deployments without `max_budget` or without the
processor. Without this middleware the engine serves such a request at
`max_budget` and logs a warning (`snapkv.requests.warn_if_capped`).
"""

from __future__ import annotations

import json

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import VLLMValidationError

from vllm_thinkv.snapkv.budgets import RequestBudget
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.requests import deployment_settings

PARAM = "vllm_xargs"
# The routes whose JSON bodies carry `vllm_xargs` (the request classes of vLLM 0.32 and 0.33:
# completions, chat completions, responses, Anthropic messages; SageMaker's /invocations
# hands its body to the first two). The audio routes take form data; the engine caps those.
PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations"})


def refusal(body: bytes, deployment: SnapKVConfig) -> str | None:
    """Why a request body asks for more than the deployment allows, or None (also for a body
    that is not JSON or has malformed values: vLLM and `validate_params` answer those)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    xargs = request.get(PARAM) if isinstance(request, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        budget = RequestBudget.from_extra_args(xargs)
    except ValueError:
        return None
    return budget.above_max(deployment) if budget is not None else None


class SnapKVBudgetLimit:
    """Pure ASGI (vLLM's `--middleware` adds a class with `app.add_middleware(cls)`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._known = False  # whether _deployment is read yet (from the first request's app)
        self._deployment: SnapKVConfig | None = None

    def limit(self, scope: Scope) -> SnapKVConfig | None:
        """The deployment's SnapKV settings where it takes per-request budgets and caps them."""
        if not self._known:
            vllm_config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            if vllm_config is None:  # not vLLM's server, or not set up yet: decide on a later request
                return None
            deployment = deployment_settings(vllm_config)
            if deployment is not None and deployment.per_request and deployment.max_budget is not None:
                self._deployment = deployment
            self._known = True
        return self._deployment

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in PATHS:
            await self.app(scope, receive, send)
            return
        deployment = self.limit(scope)
        if deployment is None:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away before sending it all
            return
        message = refusal(body, deployment)
        if message is not None:
            error = create_error_response(VLLMValidationError(f"thinkv SnapKV: {message}", parameter=PARAM))
            await JSONResponse(error.model_dump(), status_code=error.error.code)(scope, receive, send)
            return
        await self.app(scope, replay(body, receive), send)


async def read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read here, in one message, then the client's own
    messages (vLLM listens for its disconnect while streaming)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
