"""Request bodies of the HTTP API (OpenAI and llama-server shapes, plus dmoe's extensions)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use

    model: str | None = None
    max_tokens: int | None = Field(default=None, description="default 256")
    max_completion_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    lora: list[LoraScale] | None = Field(default=None, description="llama-server: per-request adapter scales by id")
    experts: list[ExpertScale] | None = Field(default=None, description="dmoe: a blend of experts by name")
    return_token_ids: bool = Field(default=False, description="as vLLM: include the completion's token ids")


class ChatRequest(_Generation):
    messages: list[Message]


class CompletionRequest(_Generation):
    prompt: str | list[str]


class LoadExpertRequest(BaseModel):
    path: str
    name: str | None = Field(default=None, description="must match the card's name if given")
