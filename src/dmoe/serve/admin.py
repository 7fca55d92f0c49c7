"""llama-server's /lora-adapters, dmoe's /v1/experts (hot load / unload), /health, /metrics.

Every state-changing route checks the API key first (when one is set), and validates
the whole request before it changes anything.
"""

from __future__ import annotations

import asyncio
import json
import secrets

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from pydantic import TypeAdapter, ValidationError

from dmoe.engine.request import check_scale
from dmoe.errors import ExpertError, RequestError, Unauthorized
from dmoe.experts import check_base, resolve_expert
from dmoe.runtime import ApiState
from dmoe.serve.errors import documented_errors
from dmoe.serve.openai import lora_adapter, state
from dmoe.serve.schemas import (
    ExpertList,
    ExpertLoaded,
    ExpertUnloaded,
    Health,
    LoadExpertRequest,
    LoraAdapter,
    LoraScale,
    Success,
)

router = APIRouter()
ROUTER_WAIT_S = 300.0  # a load with wait_router waits this long for the refit at most
_LORA_LIST = TypeAdapter(list[LoraScale])


def require_key(st: ApiState, request: Request) -> None:
    """The API key (``Authorization: Bearer`` or ``X-API-Key``), compared in constant time."""
    if not st.api_key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), st.api_key.encode()):
        raise Unauthorized("this endpoint changes the server's state and needs the API key: send 'Authorization: Bearer <key>'")


def _adapters(st: ApiState) -> list[dict]:
    res = st.names()
    return [{"id": i, "path": res[n], "scale": st.defaults.get(n, 0.0)} for i, n in sorted(st.adapter_ids.items()) if n in res]


# state-changing routes: the key is optional (only when the server sets one)
_KEYED = {"security": [{}, {"apiKey": []}]}
_LORA_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "items": {"$ref": "#/components/schemas/LoraScale"}}}}}}


@router.get("/lora-adapters", response_model=list[LoraAdapter])
async def lora_adapters(request: Request):
    return _adapters(state(request))


@router.post("/lora-adapters", response_model=Success, responses=documented_errors(401, 404),
             openapi_extra={**_KEYED, **_LORA_BODY})
async def set_lora_adapters(request: Request):
    """llama-server's semantics: the listed adapters get their scales and every other adapter
    gets 0, so posting ``[{"id": 1, "scale": 1}]`` switches from expert 0 to expert 1 (it does
    not blend them). Answers ``{"success": true}``; ``GET /lora-adapters`` shows the scales."""
    # Parsed by hand: the seed's `curl -d '[...]'` sends no JSON content type, and llama-server accepts it.
    st = state(request)
    require_key(st, request)
    try:
        raw = json.loads(await request.body() or b"null")
    except ValueError:  # not JSON, or not UTF-8 text
        raw = None
    if not isinstance(raw, list):
        raise RequestError('Request body must be an array: [{"id": 0, "scale": 1.0}, ...]')
    try:
        items = _LORA_LIST.validate_python(raw)
    except ValidationError as exc:
        raise RequestError(f"expected [{{\"id\": 0, \"scale\": 1.0}}, ...]: {exc.errors()[0]['msg']}") from None
    new: dict[str, float] = {}
    for item in items:
        name = lora_adapter(st, item)
        new[name] = check_scale(name, item.scale)
    st.defaults = new  # one assignment: requests see the old defaults or the new, never a mix
    return {"success": True}


@router.post("/v1/experts", response_model=ExpertLoaded, responses=documented_errors(401, 403, 404, 409),
             openapi_extra=_KEYED)
async def load_expert(body: LoadExpertRequest, request: Request):
    st = state(request)
    require_key(st, request)
    expert = resolve_expert(body.path, st.roots)
    if body.name and body.name != expert.name:
        raise ExpertError(f"the expert at {body.path} is named '{expert.name}', not '{body.name}'")
    check_base(expert, st.base)
    res = await st.backend.load_expert(expert)
    st.register(expert.name, expert)
    await _follow(st, body.wait_router)
    return {**res, "router": st.router_status}


@router.delete("/v1/experts/{name}", response_model=ExpertUnloaded, responses=documented_errors(401, 404, 409),
               openapi_extra=_KEYED)
async def unload_expert(name: str, request: Request, wait_router: bool = Query(
        False, description="answer after the router refit; otherwise it runs in the background")):
    st = state(request)
    require_key(st, request)
    await st.backend.unload_expert(name)
    st.forget(name)
    await _follow(st, wait_router)
    return {"unloaded": name, "router": st.router_status}


async def _follow(st: ApiState, wait: bool) -> None:
    """The router follows the loaded experts: refit in the background (or wait for it)."""
    thread = st.refit_router()
    if thread is not None and wait:
        await asyncio.to_thread(thread.join, ROUTER_WAIT_S)


@router.get("/v1/experts", response_model=ExpertList)
async def list_experts(request: Request):
    """The loaded experts (with their llama-server ids) and the router's state."""
    st = state(request)
    ids = {n: i for i, n in st.adapter_ids.items()}
    experts = [{"name": n, "id": ids.get(n), **info, "domain": st.cards[n].card.domain if n in st.cards else None}
               for n, info in sorted(st.backend.expert_info().items())]
    return {"experts": experts, "router": st.router_status}


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "draining or down"}})
async def health(request: Request):
    st = state(request)
    h = st.backend.health()
    return JSONResponse({"status": h["status"], "experts": sorted(st.names()), "running": h["running"], "waiting": h["waiting"]},
                        status_code=200 if h["ok"] else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}})
async def metrics(request: Request):
    st = state(request)
    m = st.metrics
    st.backend.update_gauges(m)
    return PlainTextResponse(generate_latest(m.registry).decode(), media_type="text/plain; version=0.0.4")
