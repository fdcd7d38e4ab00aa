"""The Ray Serve application: FastAPI ingress + Drafter, Verifier and Validator deployments.

``serve_config.yaml`` points at ``deployments.app:build_app``; its ``args:`` parse into
:class:`deployments.config.AppArgs`.
"""


import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.gateway import Gateway, Limits, Reply
from pipeline.orchestrator import DrafterHealth, Pipeline, StructuredPolicy
from pipeline.router import RouterPolicy
from pipeline.telemetry import configure_tracing
from pipeline.validation import default_registry, load_validator_factory

from .config import AppArgs
from .metrics import ServeMetrics
from .workers import ARHandle, DraftHandle, DrafterDeployment, ValidatorDeployment, ValidatorHandle, VerifierDeployment

http = FastAPI(title="dgserve", description="OpenAI-compatible DiffusionGemma + AR serving")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


@http.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), "invalid_request_error")


@http.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(400, "invalid request", "invalid_request_error")


@http.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    return _error(500, "internal error", "server_error")


def _respond(reply: Reply) -> Response:
    if reply.stream is not None:
        headers = {**reply.headers, "cache-control": "no-cache"}
        return StreamingResponse(reply.stream, media_type="text/event-stream", headers=headers)
    return JSONResponse(reply.body, reply.status, headers=reply.headers)


@serve.deployment(name="Ingress")
@serve.ingress(http)
class Ingress:
    def __init__(self, args: AppArgs, drafter, ar, validator):
        configure_tracing("ingress")
        factories = {k: load_validator_factory(v) for k, v in args.validator.validators.items()}
        policy = RouterPolicy(args.router.drafter_queue_threshold, args.router.prose_route,
                              args.router.greedy_prose_route)
        health = DrafterHealth(args.router.drafter_failures_before_cooldown, args.router.drafter_cooldown_s)
        pipeline = Pipeline(DraftHandle(drafter), ARHandle(ar), ValidatorHandle(validator), policy, health,
                            StructuredPolicy(args.structured.on_repair_failure))
        lim = args.limits
        limits = Limits(lim.max_tokens, lim.default_max_tokens, lim.max_prompt_chars, lim.max_body_bytes,
                        lim.request_timeout_s)
        api_key = None
        if args.auth.api_key_env is not None:
            api_key = os.environ.get(args.auth.api_key_env)
            if not api_key:
                raise ValueError(f"auth.api_key_env names {args.auth.api_key_env!r}, which is not set")
        self.gateway = Gateway(pipeline, args.model_name, limits, default_registry(factories), api_key,
                               ServeMetrics())

    @http.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return _respond(await self.gateway.chat(await request.body(), request.headers))

    @http.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return _respond(await self.gateway.completions(await request.body(), request.headers))

    @http.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return _respond(self.gateway.models(request.headers))

    @http.get("/health")
    async def health(self) -> Response:
        return _respond(self.gateway.health())


def build_app(args: dict | None = None):
    """Application builder for ``serve run``/``serve deploy`` (``import_path: deployments.app:build_app``)."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    same = a.verifier.source == "same"
    drafter = DrafterDeployment.options(**a.drafter.replica.options()).bind(a.drafter, a.verifier, a.structured)
    ar = drafter if same else VerifierDeployment.options(**a.verifier.replica.options()).bind(a.verifier, a.structured)
    validator = ValidatorDeployment.options(**a.validator.replica.options()).bind(a.validator)
    return Ingress.options(**a.ingress.options()).bind(a, drafter, ar, validator)
