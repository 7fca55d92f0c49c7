"""Bodies of the HTTP API: requests (OpenAI and llama-server shapes, plus dmoe's extensions) and responses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

# Request models are strict (a JSON false is not a 0, a "16" is not 16), and their schema
# says so: no additional properties (dmoe refuses unknown fields by name), and each number's
# range as SamplingParams checks it (the check stays there; the schema documents it).
STRICT = ConfigDict(strict=True, extra="forbid")


def _range(**bounds: float) -> dict:
    return {"json_schema_extra": bounds}


class LoraScale(BaseModel):
    """llama-server's per-adapter scale: ``{"id": 0, "scale": 1.0}``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    id: int
    scale: float
    path: str | None = Field(default=None, description="as GET /lora-adapters shows it (so its output can be posted "
                                                        "back); when given it must be that adapter's path")


class ExpertScale(BaseModel):
    """dmoe's blend entry: ``{"name": "cooking", "scale": 0.5}``."""

    model_config = STRICT
    name: str
    scale: float = 1.0


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"additionalProperties": False})
    role: str
    content: str | list[dict[str, Any]] | None = None


MAX_N = 16  # choices per request at most
MAX_STOP = 8  # stop strings at most
MAX_LOGIT_BIAS = 300  # logit_bias entries at most (OpenAI's limit)
MAX_MESSAGES = 1024  # chat messages at most


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(default=False, description="a last chunk with empty choices and the usage")


ROUTINGS = ("threshold", "top1", "topk", "load", "latency")
AGGREGATES = ("weighted", "vote", "ensemble")


class DmoeOptions(BaseModel):
    """dmoe's per-request routing options (``"dmoe": {...}``): how ``model=auto`` picks experts
    and, on a cluster, how a top-k fan-out is aggregated and how long an expert may take."""

    model_config = ConfigDict(extra="forbid", strict=True)

    routing: Literal["threshold", "top1", "topk", "load", "latency"] | None = Field(
        default=None, description="threshold | top1 | topk (any server); load | latency (dmoe cluster); default: the server's")
    k: int | None = Field(default=None, ge=1, le=8, description="topk: how many experts (default 2)")
    min_prob: float | None = Field(default=None, ge=0, le=1, description="topk: the least router probability an expert "
                                   "needs to be one of the k (default 0.2; 0: always the k likeliest)")
    aggregate: Literal["weighted", "vote", "ensemble"] | None = Field(
        default=None, description="topk on a cluster: weighted | vote | ensemble (default weighted); one server: ensemble only")
    timeout_s: float | None = Field(default=None, gt=0, le=3600, description="dmoe cluster: per-expert timeout before failover")


class _Generation(BaseModel):
    """Every field here is honoured or refused with a 400 that names it; an unknown field is
    refused too (``dmoe serve --lenient`` ignores unknown fields instead, for clients that send junk)."""

    # extra="allow": unknown fields are kept, so the 400 can name them (the schema says none are allowed)
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"additionalProperties": False})

    model: str | None = None
    max_tokens: int | None = Field(default=None, description="default 256", **_range(minimum=1))
    max_completion_tokens: int | None = Field(default=None, **_range(minimum=1))
    temperature: float = Field(default=0.0, description="0 = greedy", **_range(minimum=0))
    top_p: float = Field(default=1.0, **_range(exclusiveMinimum=0, maximum=1))
    top_k: int = Field(default=0, description="0 = off", **_range(minimum=0))
    seed: int | None = Field(default=None, description="per-request generator: the same seed samples the same text")
    stop: str | list[str] | None = Field(default=None, description=f"up to {MAX_STOP} stop strings", json_schema_extra={
        "anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                                       "maxItems": MAX_STOP}, {"type": "null"}]})
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices; sampled ones use seed, seed+1, ... when a seed is given")
    ignore_eos: bool = Field(default=False, description="llama-server: generate exactly max_tokens (benchmarks)")
    user: str | None = Field(default=None, description="the client's end-user id (accepted, not used)")
    presence_penalty: float = Field(default=0.0, description="in [-2, 2]: minus this for each token already in the output",
                                    **_range(minimum=-2, maximum=2))
    frequency_penalty: float = Field(default=0.0, description="in [-2, 2]: minus this times each token's count in the output",
                                     **_range(minimum=-2, maximum=2))
    repetition_penalty: float = Field(default=1.0, validation_alias=AliasChoices("repetition_penalty", "repeat_penalty"),
                                      description="> 0, 1 = off (llama-server: repeat_penalty): prompt and output tokens, "
                                                  "logit / p if positive, logit * p if not",
                                      **_range(exclusiveMinimum=0))
    logprobs: bool | int | None = Field(default=None, description="chat: true/false; completions: how many top tokens (0-20)")
    top_logprobs: int | None = Field(default=None, description="chat: the most likely tokens per position (0-20); needs logprobs")
    logit_bias: dict[str, float] | None = Field(default=None, description="token id (a string) -> bias in [-100, 100]",
                                                json_schema_extra={"anyOf": [{
                                                    "type": "object", "maxProperties": MAX_LOGIT_BIAS,
                                                    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                                    "additionalProperties": {"type": "number", "minimum": -100,
                                                                             "maximum": 100}}, {"type": "null"}]})
    response_format: dict[str, Any] | None = Field(
        default=None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name": .., "schema": {..}}}')
    tools: list[dict[str, Any]] | None = Field(default=None, description="not supported: empty only",
                                               json_schema_extra={"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]})
    tool_choice: str | dict[str, Any] | None = Field(default=None, description='"none" only',
                                                     json_schema_extra={"anyOf": [{"const": "none"}, {"type": "null"}]})
    # dmoe's and llama-server's extensions
    lora: list[LoraScale] | None = Field(default=None, description="llama-server: per-request adapter scales by id")
    experts: list[ExpertScale] | None = Field(default=None, description="dmoe: a blend of experts by name")
    return_token_ids: bool = Field(default=False, description="as vLLM: include the completion's token ids")
    dmoe: DmoeOptions | None = Field(default=None, description="dmoe: routing strategy, top-k aggregation, failover timeout")
    json_schema: dict[str, Any] | None = Field(default=None, description="llama-server: the output's JSON Schema")
    grammar: str | None = Field(default=None, description="llama-server: a GBNF grammar the output must match")

    def unsupported(self) -> list[str]:
        """Why each field this request sets cannot be honoured (empty: all fine)."""
        out = []
        if self.tools:
            out.append("tools: function calling is not supported; send the request without tools")
        if self.tool_choice not in (None, "none"):
            out.append("tool_choice: function calling is not supported")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            out.append(f"stop: at most {MAX_STOP} stop strings, got {len(self.stop)}")
        formats = [f for f in ("response_format", "json_schema", "grammar")
                   if getattr(self, f) is not None and (f != "response_format" or (self.response_format or {}).get("type") != "text")]
        if len(formats) > 1:
            out.append(f"{' and '.join(formats)}: give one output format, not {len(formats)}")
        if len(self.logit_bias or {}) > MAX_LOGIT_BIAS:
            out.append(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias or {})}")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                out.append(f"logit_bias: keys are token ids as strings (\"1234\"), got {key!r}")
        return out


class ChatRequest(_Generation):
    messages: list[Message] = Field(json_schema_extra={"minItems": 1, "maxItems": MAX_MESSAGES})
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="extra variables for the chat template (e.g. enable_thinking), as vLLM and llama-server")


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(description="one prompt (a list of one string is accepted)", json_schema_extra={
        "anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                                       "minItems": 1, "maxItems": 1}]})


class LoadExpertRequest(BaseModel):
    model_config = STRICT
    path: str
    name: str | None = Field(default=None, description="must match the card's name if given")
    wait_router: bool = Field(default=False, description="answer after the router refit (its validation accuracy is in "
                                                         "the response); otherwise it runs in the background")


# --------------------------------------------------------------------------- responses
# Documentation models: the OpenAPI schema promises these shapes, and the Schemathesis
# test (tests/test_api_fuzz.py) checks every response against them.
class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error, model_not_found")
    code: int | str = Field(description="the HTTP status (a name, such as request_too_large, from the guard)")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx: OpenAI's error shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ExpertUsed(BaseModel):
    name: str
    scale: float


class RouteInfo(BaseModel):
    """How ``model=auto`` chose (``dmoe.route.decision.RouteDecision``)."""

    model_config = ConfigDict(extra="allow")
    experts: list[ExpertUsed]
    confidence: float
    reason: str
    label: str


class DmoeInfo(BaseModel):
    experts: list[ExpertUsed] = Field(description="the adapter set that served the request")
    route: RouteInfo | None = None


class ChatMessageOut(BaseModel):
    role: str
    content: str


class _Choice(BaseModel):
    index: int
    logprobs: dict[str, Any] | None
    finish_reason: str
    token_ids: list[int] | None = Field(default=None, description="with return_token_ids")


class ChatChoice(_Choice):
    message: ChatMessageOut


class TextChoice(_Choice):
    text: str


class _Completion(BaseModel):
    id: str
    object: str = Field(description="chat.completion or text_completion")
    created: int
    model: str
    usage: Usage
    dmoe: DmoeInfo


class ChatCompletion(_Completion):
    choices: list[ChatChoice]


class TextCompletion(_Completion):
    choices: list[TextChoice]


class ModelCard(BaseModel):
    id: str
    object: str
    owned_by: str


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class LoraAdapter(BaseModel):
    id: int
    path: str
    scale: float


class Success(BaseModel):
    success: bool


class RouterStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: str = Field(description="none, keyword, ready, refitting or failed")


class ExpertLoaded(BaseModel):
    name: str
    slot: int | None = Field(description="the engine's adapter slot (None on a cluster: each replica has its own)")
    rank: int
    path: str
    router: RouterStatus


class ExpertUnloaded(BaseModel):
    unloaded: str
    router: RouterStatus


class ExpertInfo(BaseModel):
    name: str
    id: int | None
    slot: int | None
    rank: int
    path: str
    domain: str | None


class ExpertList(BaseModel):
    experts: list[ExpertInfo]
    router: RouterStatus


class Health(BaseModel):
    status: str = Field(description="ok (200), draining or down (503)")
    experts: list[str]
    running: int
    waiting: int
