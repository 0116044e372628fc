"""One structured log line per HTTP request, written when its response has been sent.

A pure ASGI middleware, so a streamed response is logged at its end (with its real latency
and token counts), not when its headers go out. Handlers put the request id, token counts
and finish reason on `request.state`; the middleware also counts responses by route and
status in Prometheus.
"""
from __future__ import annotations

import logging
import time

from server import metrics

logger = logging.getLogger("gorgon.access")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/docs",
          "/openapi.json")
QUIET_ROUTES = ("/health", "/metrics")  # polled often: logged at debug level
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


class AccessLogMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # shared with request.state below
        start = time.perf_counter()
        response = {"status": None, "complete": False}

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            status = response["status"]
            if status is None:
                status = 500            # an exception escaped before any response
            elif not response["complete"]:
                status = CLIENT_CLOSED  # a stream cut short by its client
            self._log(scope, status, time.perf_counter() - start)

    @staticmethod
    def _log(scope, status: int, latency_s: float) -> None:
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        metrics.http_requests.labels(route=route, status_code=str(status)).inc()
        state = scope.get("state") or {}
        fields = {
            "request_id": state.get("request_id", "-"),
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "prompt_tokens": state.get("prompt_tokens", 0),
            "completion_tokens": state.get("completion_tokens", 0),
            "finish_reason": state.get("finish_reason") or "-",
            "latency_ms": f"{latency_s * 1000:.1f}",
        }
        level = logging.DEBUG if path in QUIET_ROUTES else logging.INFO
        logger.log(level, "request " + " ".join(f"{k}={v}" for k, v in fields.items()))
