"""The FastAPI app (routes, errors in OpenAI's shape, API key, metrics) and `pagedllm serve`."""

from __future__ import annotations

import logging
import os
import secrets
import signal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedllm
from pagedllm.core.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    EngineStepError,
)
from pagedllm.core.config import EngineConfig, ServerConfig
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    RequestError,
    TokenizeRequest,
)
from pagedllm.entrypoints.openai.serving import (
    EventStream,
    OpenAIServing,
    error_body,
    served_model_names,
    until_disconnected,
)
from pagedllm.entrypoints.openai.serving_chat import ChatServing
from pagedllm.entrypoints.openai.serving_completion import CompletionServing

logger = logging.getLogger("pagedllm.entrypoints.openai")

#: Seconds a client told "overloaded" (503) should wait before retrying.
RETRY_AFTER_SECONDS = 1


class SSEResponse(StreamingResponse):
    """Server-sent events that abort their engine requests however the response ends."""

    def __init__(self, stream: EventStream, engine: AsyncLLMEngine) -> None:
        super().__init__(stream.events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._stream = stream
        self._engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.events.aclose()  # runs the generators' clean-up now, not at GC
            for request_id in self._stream.request_ids:
                self._engine.abort(request_id)


def _error(exc: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not loc:
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
    if param and "input" in first and not isinstance(first["input"], (dict, list)):
        message += f" (got {first['input']!r})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return message, param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(RequestError(message, param=param))

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError) -> JSONResponse:  # the engine's word for bad input
        return _error(RequestError(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(RequestError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        error = RequestError(str(exc), status=503, type="server_error", code="engine_overloaded")
        return _error(error, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(RequestError(str(exc), status=503, type="server_error", code="engine_unavailable"))

    @app.exception_handler(EngineStepError)
    async def step_failed(_: Request, exc: EngineStepError) -> JSONResponse:
        return _error(RequestError(str(exc), status=500, type="server_error", code="engine_error"))

    @app.exception_handler(Exception)
    async def server_bug(_: Request, exc: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return _error(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error"))


def build_app(engine: AsyncLLMEngine, server_config: ServerConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app over a running AsyncLLMEngine (the caller owns and shuts down the engine)."""
    server_config = server_config or engine.config.server_config
    app = FastAPI(title="pagedllm", version=pagedllm.__version__)
    metrics = ServerMetrics(engine, served_model_names(engine)[0])
    serving = OpenAIServing(engine, server_config, metrics)
    completions, chat = CompletionServing(serving), ChatServing(serving)
    app.state.engine, app.state.metrics = engine, metrics
    _add_error_handlers(app)

    if server_config.api_key:
        expected = f"Bearer {server_config.api_key}".encode()

        @app.middleware("http")
        async def check_api_key(request: Request, call_next):
            if request.url.path.startswith("/v1") and request.method != "OPTIONS":
                given = request.headers.get("authorization", "").encode()
                if not secrets.compare_digest(given, expected):
                    return _error(RequestError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                                               status=401, type="authentication_error", code="invalid_api_key"))
            return await call_next(request)

    if server_config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server_config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)

    def respond(result: Any) -> Response:
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        if isinstance(result, EventStream):
            return SSEResponse(result, engine)
        return JSONResponse(result.model_dump())

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return respond(await until_disconnected(raw_request.receive, completions.create(request)))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return respond(await until_disconnected(raw_request.receive, chat.create(request)))

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, root=engine.config.model_config.model or str(engine.engine.source.path),
                         max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[model_card(n) for n in serving.model_names]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> JSONResponse:
        serving.check_model(model)
        return JSONResponse(model_card(model).model_dump())

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        serving.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise RequestError("give exactly one of prompt and messages", param="prompt")
        if request.messages is not None:
            prompt = serving.chat_prompt(
                request.messages, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message, chat_template=request.chat_template,
                chat_template_kwargs=request.chat_template_kwargs, add_special_tokens=bool(request.add_special_tokens),
            )
        else:
            add_special = True if request.add_special_tokens is None else request.add_special_tokens
            prompt = serving.tokenize_prompt(request.prompt, add_special)  # type: ignore[arg-type]
        body: dict[str, Any] = {"count": len(prompt.token_ids), "max_model_len": engine.max_model_len,
                                "tokens": prompt.token_ids}
        if request.return_token_strs:
            body["token_strs"] = serving.tokenizer.convert_ids_to_tokens(prompt.token_ids)
        return JSONResponse(body)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        serving.check_model(request.model)
        if request.tokens:
            serving.tokenize_prompt(request.tokens, False, field="tokens")  # checks the ids are in the vocabulary
        return JSONResponse({"prompt": serving.tokenizer.decode(request.tokens)})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagedllm.__version__})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def log_banner(engine: AsyncLLMEngine, server_config: ServerConfig) -> None:
    e = engine.engine
    plugins = ", ".join(f"{p.plugin} ({p.package} {p.version})" for p in e.plugins.plugins) or "none"
    names = served_model_names(engine)
    logger.info("pagedllm %s serving %s as %s", pagedllm.__version__, e.source.path, ", ".join(names))
    logger.info("model: arch=%s dtype=%s device=%s max_model_len=%d; KV cache: %d blocks of %d tokens; "
                "attention backend: %s", (getattr(e.hf_config, "architectures", None) or ["?"])[0],
                str(e.dtype).removeprefix("torch."), e.device, e.max_model_len, e.kv_cache.num_blocks,
                e.kv_cache.block_size, e.attention_backend)
    logger.info("plugins: %s", plugins)
    for error in e.plugins.errors:
        logger.warning("plugin %s", error.describe())
    logger.info("listening on http://%s:%d (API key %s)", server_config.host, server_config.port,
                "required" if server_config.api_key else "not required")


def run_server(options: dict[str, Any]) -> int:
    """`pagedllm serve`: load the model, serve until SIGINT/SIGTERM, shut down cleanly (exit 0)."""
    import uvicorn

    from pagedllm.core.engine import LLMEngine

    config = EngineConfig.from_options(**options)
    server_config = config.server_config
    if not server_config.api_key and os.environ.get("PAGEDLLM_API_KEY"):
        server_config.api_key = os.environ["PAGEDLLM_API_KEY"]
    engine = AsyncLLMEngine(LLMEngine(config))
    try:
        app = build_app(engine, server_config)  # an unknown tool parser fails here
    except BaseException:
        engine.shutdown()
        raise
    log_banner(engine, server_config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level=server_config.uvicorn_log_level.lower(),
        timeout_graceful_shutdown=server_config.shutdown_timeout,
    ))
    # uvicorn re-raises the signal that stopped it once it is done; by then the shutdown
    # was graceful, so that signal must not turn into a non-zero exit.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        engine.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("pagedllm server stopped")
    return 0 if server.started else 1
