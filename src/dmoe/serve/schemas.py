"""Request bodies of the HTTP API (OpenAI and llama-server shapes, plus dmoe's extensions)."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class LoraScale(BaseModel):
    """llama-server's per-adapter scale: ``{"id": 0, "scale": 1.0}``."""

    id: int
    scale: float


class ExpertScale(BaseModel):
    """dmoe's blend entry: ``{"name": "cooking", "scale": 0.5}``."""

    name: str
    scale: float = 1.0


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


MAX_N = 16  # choices per request at most
MAX_STOP = 8  # stop strings at most
MAX_LOGIT_BIAS = 300  # logit_bias entries at most (OpenAI's limit)
MAX_MESSAGES = 1024  # chat messages at most


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(default=False, description="a last chunk with empty choices and the usage")


class _Generation(BaseModel):
    """Every field here is honoured or refused with a 400 that names it; an unknown field is
    refused too (``dmoe serve --lenient`` ignores unknown fields instead, for clients that send junk)."""

    model_config = ConfigDict(extra="allow")  # kept, so unknown fields can be named in the 400

    model: str | None = None
    max_tokens: int | None = Field(default=None, description="default 256")
    max_completion_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = Field(default=None, description="per-request generator: the same seed samples the same text")
    stop: str | list[str] | None = Field(default=None, description=f"up to {MAX_STOP} stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices; sampled ones use seed, seed+1, ... when a seed is given")
    ignore_eos: bool = Field(default=False, description="llama-server: generate exactly max_tokens (benchmarks)")
    user: str | None = Field(default=None, description="the client's end-user id (accepted, not used)")
    presence_penalty: float = Field(default=0.0, description="in [-2, 2]: minus this for each token already in the output")
    frequency_penalty: float = Field(default=0.0, description="in [-2, 2]: minus this times each token's count in the output")
    repetition_penalty: float = Field(default=1.0, validation_alias=AliasChoices("repetition_penalty", "repeat_penalty"),
                                      description="> 0, 1 = off (llama-server: repeat_penalty): prompt and output tokens, "
                                                  "logit / p if positive, logit * p if not")
    logprobs: bool | int | None = Field(default=None, description="chat: true/false; completions: how many top tokens (0-20)")
    top_logprobs: int | None = Field(default=None, description="chat: the most likely tokens per position (0-20); needs logprobs")
    logit_bias: dict[str, float] | None = Field(default=None, description="token id (a string) -> bias in [-100, 100]")
    response_format: dict[str, Any] | None = Field(
        default=None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name": .., "schema": {..}}}')
    tools: list[dict[str, Any]] | None = Field(default=None, description="not supported: empty only")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description='"none" only')
    # dmoe's and llama-server's extensions
    lora: list[LoraScale] | None = Field(default=None, description="llama-server: per-request adapter scales by id")
    experts: list[ExpertScale] | None = Field(default=None, description="dmoe: a blend of experts by name")
    return_token_ids: bool = Field(default=False, description="as vLLM: include the completion's token ids")
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
    messages: list[Message]
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="extra variables for the chat template (e.g. enable_thinking), as vLLM and llama-server")


class CompletionRequest(_Generation):
    prompt: str | list[str]


class LoadExpertRequest(BaseModel):
    path: str
    name: str | None = Field(default=None, description="must match the card's name if given")
    wait_router: bool = Field(default=False, description="answer after the router refit (its validation accuracy is in "
                                                         "the response); otherwise it runs in the background")
