"""The router's one ASGI middleware: API-key check, the request id and request counting.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps every response body in an
extra task and stream (a cost on every request and every streamed chunk).
"""

from __future__ import annotations

import time
import uuid

from frugalserve.serve_app.auth import authorized
from frugalserve.serve_app.errors import error_body
from frugalserve.serve_app.metrics import router_metrics
from starlette.responses import JSONResponse


def api_path(scope) -> str:
    """The path below the application's route prefix (Starlette keeps the prefix in it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class RouterMiddleware:
    """`api_keys`: the keys a /v1 request must bear one of; None: no auth."""

    def __init__(self, app, api_keys: frozenset[str] | None = None):
        self.app, self.api_keys = app, api_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not api_path(scope).startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id(scope)
        if self.api_keys is not None:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not authorized(header, self.api_keys):
                response = JSONResponse(error_body(
                    "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                    "invalid_request_error", None, "invalid_api_key"), 401)
                return await response(scope, receive, send)
        state["started"] = start = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if scope["method"] == "POST":
                m = router_metrics()
                model, policy = state.get("model", "unknown"), state.get("policy", "none")
                m["requests"].inc(1, {"model": model, "policy": policy, "status": str(status[0])})
                if not state.get("streaming", False):  # streams time their own (StreamTimer)
                    m["e2e"].observe(time.perf_counter() - start,
                                     {"model": model, "policy": policy})


def request_id(scope) -> str:
    """The request's `X-Request-Id`: the client's, or the one Serve's proxy made for it (its
    request-id middleware adds it to the request's headers and echoes it on the response)."""
    given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1").strip()
    return given if given else uuid.uuid4().hex
