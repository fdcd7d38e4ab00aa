"""OpenAI-compatible request and response models (pydantic, at the HTTP edge).

Extensions beyond the OpenAI schema, all optional:

* request ``route``: ``"auto"`` (default), ``"ar"``, ``"diffusion"`` or ``"verify"``; the openai
  client sends it with ``extra_body={"route": "ar"}``;
* request ``response_format: {"type": "regex", "regex": {"pattern": "..."}}`` and
  ``{"type": "sudoku", "sudoku": {"puzzle": "..."}}`` where validators for them are registered;
* response ``route``: the path taken and why (also in the ``x-route`` header), and ``stats``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from models.constraints import ConstraintKind

Route = Literal["auto", "ar", "diffusion", "verify"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"unsupported content part type {part.type!r}; only text is served")
            parts.append(part.text)
        return "".join(parts)


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class RegexSpec(BaseModel):
    pattern: str


class SudokuSpec(BaseModel):
    puzzle: str


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = "text"
    json_schema: JsonSchemaSpec | None = None
    regex: RegexSpec | None = None
    sudoku: SudokuSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "ResponseFormat":
        if self.type == ConstraintKind.JSON_SCHEMA and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        if self.type == ConstraintKind.REGEX and self.regex is None:
            raise ValueError("response_format of type regex needs a regex object with a pattern")
        if self.type == ConstraintKind.SUDOKU and self.sudoku is None:
            raise ValueError("response_format of type sudoku needs a sudoku object with a puzzle")
        return self

    @property
    def structured(self) -> bool:
        return self.type != "text"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    route: Route = "auto"

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str
    response_format: ResponseFormat | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RouteInfo(BaseModel):
    path: str  # "ar" | "diffusion" | "verify"
    reason: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    route: RouteInfo
    stats: dict[str, float | int | bool | str] = Field(default_factory=dict)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    route: RouteInfo
    stats: dict[str, float | int | bool | str] = Field(default_factory=dict)


class _Sparse(BaseModel):
    """Serialises without its unset optional parts (``None``), as OpenAI's stream chunks do."""

    @model_serializer(mode="wrap")
    def _present(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k == "finish_reason"}


class ChatDelta(_Sparse):
    role: Literal["assistant"] | None = None  # the first chunk
    content: str | None = None  # absent in the closing chunk


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class _Chunk(_Sparse):
    """One server-sent event of a stream (``data: <this as JSON>``)."""

    id: str
    created: int
    model: str
    route: RouteInfo
    usage: Usage | None = None  # the last chunk, with stream_options.include_usage


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]  # empty in the usage chunk


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dgserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
