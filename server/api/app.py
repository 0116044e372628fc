"""The FastAPI application: OpenAI-compatible routes, health, metrics, auth and errors."""
from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.access_log import CLIENT_CLOSED, AccessLogMiddleware
from server.api.chat import create_chat_completion
from server.api.completions import create_completion
from server.api.errors import APIError, install_error_handlers
from server.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                 ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from server.api.serving import Serving
from server.api.streams import ClientDisconnected
from server.api.tokenize import detokenize, tokenize
from server.async_engine import AsyncEngine

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500, 503)}


def bearer_auth(api_key: str | None):
    """A dependency that demands `Authorization: Bearer <api_key>` when a key is set."""
    scheme = HTTPBearer(auto_error=False, description="The server's API key (--api-key / GORGON_API_KEY)")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(engine: AsyncEngine, api_key: str | None = None, shutdown_timeout: float = 10.0) -> FastAPI:
    """The app; its lifespan starts the engine thread (model load) and shuts it down."""
    serving = Serving(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(shutdown_timeout)

    app = FastAPI(title="Gorgon", summary="OpenAI-compatible server with speculative multi-head decoding",
                  version="0.1.0", lifespan=lifespan)
    app.add_middleware(AccessLogMiddleware)
    install_error_handlers(app)
    auth = [Depends(bearer_auth(api_key))]

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=CLIENT_CLOSED)

    @app.get("/health", tags=["operations"])
    async def health():
        """200 once the model is loaded and the server accepts requests, else 503."""
        if engine.is_ready:
            return {"status": "ok"}
        status = "failed" if engine.load_error else ("loading" if engine.engine is None else "shutting_down")
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", tags=["operations"])
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models():
        llm = serving.llm
        return ModelList(data=[ModelCard(id=llm.model_name, max_model_len=llm.max_model_len)])

    @app.get("/v1/models/{model_id:path}", dependencies=auth, response_model=ModelCard, responses=ERROR_RESPONSES)
    async def retrieve_model(model_id: str):
        llm = serving.llm
        return ModelCard(id=serving.served_model(model_id), max_model_len=llm.max_model_len)

    @app.post("/tokenize", dependencies=auth, response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize_route(body: TokenizeRequest):
        """A prompt's token ids as completions encode it, or messages' as chat renders them."""
        return tokenize(body, serving)

    @app.post("/detokenize", dependencies=auth, response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize_route(body: DetokenizeRequest):
        """Token ids -> text (special tokens kept)."""
        return detokenize(body, serving)

    @app.post("/v1/completions", dependencies=auth, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        """Text completion (OpenAI's legacy API); `stream: true` answers with Server-Sent Events."""
        return await create_completion(body, request, serving)

    @app.post("/v1/chat/completions", dependencies=auth, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion through the model's chat template; `stream: true` answers with SSE."""
        return await create_chat_completion(body, request, serving)

    return app
