"""The FastAPI ingress: bytes in and out of :class:`pipeline.gateway.Gateway` (which holds every
HTTP rule), the OpenAPI document, and the breaker's watch on the drafter."""


import asyncio
import os
from functools import partial
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.api import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    ModelList,
)
from pipeline.errors import BadRequest, HTTPStatusError, PipelineError
from pipeline.gateway import Gateway, Reply, error_reply, playground_off
from pipeline.health import watch
from pipeline.orchestrator import Pipeline
from pipeline.telemetry import configure_tracing
from pipeline.validation import RegistryValidator

from .config import AppArgs
from .handles import ARHandle, DraftHandle, ValidatorHandle
from .metrics import ServeMetrics

http = FastAPI(title="dgserve", description="OpenAI-compatible DiffusionGemma + AR serving")


@http.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _respond(error_reply(HTTPStatusError(exc.status_code, str(exc.detail))))


@http.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _respond(error_reply(BadRequest("invalid request")))


@http.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    return _respond(error_reply(PipelineError("internal error")))


# The endpoints read the raw body (the Gateway parses it, so every rule lives in one place); the
# OpenAPI document still describes the bodies, the stream's events and every answer, for clients
# and for schemathesis.
_BODIES = (ChatCompletionRequest, CompletionRequest)
_EVENTS = (ChatCompletionChunk, CompletionChunk)


def _body(model) -> dict:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def component_schemas(model_names: list[str] | None) -> dict:
    """The request bodies and stream events as OpenAPI components; ``model_names``, the model ids
    this deployment serves, become an enum in the request bodies."""
    out: dict = {}
    for model in _BODIES + _EVENTS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        if model in _BODIES and model_names is not None:
            schema["properties"]["model"]["enum"] = list(model_names)
        out[model.__name__] = schema
    return out


# one schema per server-sent event: ``data`` is a JSON chunk (ChatCompletionChunk / CompletionChunk,
# or an error object), or ``[DONE]`` at the end
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}}}
_ERRORS = {
    400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
    413: "request body too large", 422: "no answer satisfying response_format could be produced",
    429: "over capacity; retry after Retry-After seconds", 503: "a backend is unavailable; retry",
    504: "request deadline exceeded",
}


def _responses(ok_model) -> dict:
    out: dict = {200: {"model": ok_model, "content": _SSE, "description": "the answer (JSON, or SSE when stream=true)"}}
    out.update({code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()})
    return out


def openapi_document(app: FastAPI, model_names: list[str] | None) -> dict:
    """FastAPI's document of ``app`` plus :func:`component_schemas` (``app.openapi`` is FastAPI's
    documented hook for extending it); built once, then cached on the app."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version="0.1.0", description=app.description, routes=app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas(model_names))
        app.openapi_schema = doc
    return app.openapi_schema


http.openapi = partial(openapi_document, http, None)


class RequireKey:
    """With an API key configured, every path but /health (the docs and /openapi.json included)
    needs it; the Gateway checks the generation endpoints again itself. A plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs every request through an extra
    task and stream pair."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            request = Request(scope)
            gateway = getattr(request.app.state, "gateway", None)
            path = request.url.path.removeprefix(scope.get("root_path", "")) or "/"
            if gateway is not None and gateway.api_key is not None and path != "/health" \
                    and not _open_page(request, path):
                try:
                    gateway.authorize(request.headers)
                except PipelineError as e:
                    return await _respond(error_reply(e))(scope, receive, send)
        await self.app(scope, receive, send)


http.add_middleware(RequireKey)


def _open_page(request: Request, path: str) -> bool:
    """The playground's static files (no data in them; the page sends the key with each run)."""
    return request.method == "GET" and (path == "/playground" or path.startswith("/playground/"))


PLAYGROUND = resources.files("deployments") / "playground"
_ASSETS = {"index.html": "text/html", "playground.js": "text/javascript", "playground.css": "text/css"}


def playground_file(name: str) -> Response:
    """A file of the playground page (``deployments/playground/``, shipped in the package)."""
    if name not in _ASSETS:
        return _respond(error_reply(HTTPStatusError(404, f"no playground file {name!r}")))
    return Response((PLAYGROUND / name).read_bytes(), media_type=_ASSETS[name],
                    headers={"cache-control": "no-cache"})


def _respond(reply: Reply) -> Response:
    if reply.stream is not None:
        headers = {**reply.headers, "cache-control": "no-cache"}
        return StreamingResponse(reply.stream, media_type="text/event-stream", headers=headers)
    return JSONResponse(reply.body, reply.status, headers=reply.headers)


@serve.deployment(name="Ingress")
@serve.ingress(http)
class Ingress:
    async def __init__(self, args: AppArgs, models: dict, validator):
        """``models``: each model's name -> its (drafter, ar) handles (``deployments.app``). Async
        so that the router's calibration (a few requests per path) finishes before the replica
        takes traffic: the first requests are routed by measurement."""
        configure_tracing("ingress")
        self.watched = []  # (drafter handle, breaker) per model, polled by ``watch``
        self.watchers: list = []  # started on the first call (they need the replica's running event loop)
        registry = args.validator.registry()
        # ``validator``: the Validator deployment's handle; None: answers are checked here
        checked = ValidatorHandle(validator) if validator is not None else RegistryValidator(registry)
        pipelines = {}
        for i, name in enumerate(args.model_names()):
            a = args.model_args(i)
            drafter, ar = models[name]
            handle = DraftHandle(drafter, a.sampled_verify())
            health = a.router.health()
            policy = a.router.router_policy()
            pipelines[name] = Pipeline(handle, ARHandle(ar), checked, policy, health, a.structured.policy())
            self.watched.append((handle, health))
        api_key = None
        if args.auth.api_key_env is not None:
            api_key = os.environ.get(args.auth.api_key_env)
            if not api_key:
                raise ValueError(f"auth.api_key_env names {args.auth.api_key_env!r}, which is not set")
        default = pipelines.pop(args.model_name)
        self.gateway = Gateway(default, args.model_name, args.limits.limits(), registry, api_key,
                               ServeMetrics(), others=pipelines, playground=args.playground)
        # ``http`` here is the app this replica serves (Ray Serve deploys a copy of the module's)
        http.state.gateway = self.gateway
        http.openapi = partial(openapi_document, http, args.model_names())
        http.openapi_schema = None
        for pipeline in self.gateway.pipelines.values():
            policy = pipeline.policy
            if policy.kind == "measured" and policy.calibration_requests:
                from pipeline.route_estimates import calibration_jobs

                await pipeline.calibrate(calibration_jobs(min(64, args.limits.max_tokens)), policy.calibration_requests)

    def _watch(self) -> None:
        """Keep polling each model's stuck drafter work into its breaker (``pipeline.health.watch``)."""
        if not self.watchers or any(w.done() for w in self.watchers):
            for w in self.watchers:
                w.cancel()
            loop = asyncio.get_running_loop()
            self.watchers = [loop.create_task(watch(handle.status, health)) for handle, health in self.watched]

    @http.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest), responses=_responses(ChatCompletion))
    async def chat(self, request: Request) -> Response:
        self._watch()
        return _respond(await self.gateway.chat(await request.body(), request.headers))

    @http.post("/v1/completions", openapi_extra=_body(CompletionRequest), responses=_responses(Completion))
    async def completions(self, request: Request) -> Response:
        self._watch()
        return _respond(await self.gateway.completions(await request.body(), request.headers))

    @http.post("/v1/playground/runs", openapi_extra=_body(ChatCompletionRequest),
               responses={200: {"content": _SSE, "description": "the run's trace: named events, ending with "
                                "final (a ChatCompletion) or error"},
                          **{code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()}})
    async def playground_run(self, request: Request) -> Response:
        """One chat completion request, answered as the live trace of its run (``pipeline/watch.py``)."""
        self._watch()
        return _respond(await self.gateway.playground_run(await request.body(), request.headers))

    @http.get("/playground", include_in_schema=False)
    async def playground(self) -> Response:
        return self._page("index.html")

    @http.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(self, name: str) -> Response:
        return self._page(name)

    def _page(self, name: str) -> Response:
        if not self.gateway.playground:
            return _respond(playground_off())
        return playground_file(name)

    @http.get("/v1/models", responses={200: {"model": ModelList}, 401: {"model": ErrorResponse}})
    async def models(self, request: Request) -> Response:
        return _respond(self.gateway.models(request.headers))

    @http.get("/health")
    async def health(self) -> Response:
        self._watch()
        return _respond(self.gateway.health())
