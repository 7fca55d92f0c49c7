"""The web UI's pages and its UI-only endpoints (``/ui/api/...``, listed in docs/webui.md).

The pages are server-rendered Jinja2 templates (autoescaped: a dataset row holding
``<script>`` shows as text) with one small script, ``static/app.js``; nothing is fetched
from a CDN. Everything the API already does (chat, load/unload experts, default scales)
the page does through the same endpoints as ``curl``; the routes here are the few the API
has no place for: dataset upload and preview, training runs, expert cards, GGUF export.

Every state-changing route needs the API key when one is set (the page sends it as a bearer
token) and passes the same-origin check (``SameOrigin``, on every state change of the app).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from dmoe import __version__
from dmoe.errors import CrossSiteError, NotFoundError, OutsideRootsError, RequestError
from dmoe.experts import find_experts_in, resolve_expert, within_roots
from dmoe.runtime import ApiState
from dmoe.serve.admin import require_key
from dmoe.webui import datasets
from dmoe.webui.bench import BenchRuns
from dmoe.webui.forms import form_groups
from dmoe.webui.training import TrainingQueue, check_config, config_yaml

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
PAGES = ("playground", "datasets", "train", "experts")
EVENTS_MAX_S = 3600.0  # one SSE connection lasts this long at most; the page reconnects
UPLOAD_PATH = "/ui/api/datasets"


@dataclass
class WebUIConfig:
    """Where the UI reads and writes: datasets in ``data_dir``, trained experts in
    ``experts_root`` (also a root the server loads from), run records in ``runs_dir``."""

    data_dir: Path
    experts_root: Path
    runs_dir: Path
    base: str | None = None  # the served base as given (a GGUF export needs its files)
    max_upload_bytes: int = 50 * 1024 * 1024
    train_threads: int = 1
    queue: TrainingQueue | None = field(default=None, repr=False)
    bench: BenchRuns | None = field(default=None, repr=False)


def _ui(request: Request) -> WebUIConfig:
    return request.app.state.webui


def _st(request: Request) -> ApiState:
    return request.app.state.dmoe


def _queue(request: Request) -> TrainingQueue:
    ui = _ui(request)
    assert ui.queue is not None, "the training queue starts with the app"
    return ui.queue


class SameOrigin:
    """A state-changing request a browser sends from another site's page is refused (CSRF).
    Browsers send ``Origin`` on every cross-origin POST (and ``Sec-Fetch-Site``); clients that
    are not browsers (curl, SDKs) send neither and are judged by the API key alone."""

    SAFE = ("GET", "HEAD", "OPTIONS")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in self.SAFE:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            problem = cross_site(headers)
            if problem:
                from dmoe.serve.errors import error_response

                return await error_response(CrossSiteError(problem))(scope, receive, send)
        await self.app(scope, receive, send)


def cross_site(headers: dict[str, str]) -> str | None:
    """Why a request looks cross-site, or None."""
    host = headers.get("host", "").lower()
    origin = headers.get("origin")
    if origin is not None:
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            return (f"a page from {origin} may not change this server's state (the request's Origin is not "
                    f"http://{host}); use the web UI served here, or a client that is not a browser")
        return None
    site = headers.get("sec-fetch-site")
    if site not in (None, "same-origin", "none"):
        return f"a page from another site ({site}) may not change this server's state"
    return None


def mount(ui: WebUIConfig):
    """A ``create_app`` hook that adds the web UI to the API app (``dmoe webui``, ``dmoe serve --webui``)."""

    def install(app: FastAPI) -> None:
        app.state.webui = ui
        app.add_middleware(SameOrigin)
        app.include_router(router)
        app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
        if ui.queue is None:
            ui.queue = TrainingQueue(ui.runs_dir, ui.experts_root, ui.data_dir, threads=ui.train_threads)
        if ui.bench is None:
            ui.bench = BenchRuns(ui.runs_dir)
        st = app.state.dmoe
        if st is not None and ui.experts_root not in st.roots:
            st.roots.append(ui.experts_root)  # the experts trained here can be loaded
        if st is not None:  # an upload may be larger than an API body
            st.body_limits[UPLOAD_PATH] = ui.max_upload_bytes

    return install


router = APIRouter(include_in_schema=True, tags=["web UI"])
templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescapes .html


# ------------------------------------------------------------------ pages
@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/playground")


@router.get("/ui", include_in_schema=False)
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/playground")


@router.get("/ui/{page}", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request, page: str) -> HTMLResponse:
    if page not in PAGES:
        raise NotFoundError(f"no page /ui/{page}; pages: {', '.join(PAGES)}")
    st, ui = _st(request), _ui(request)
    ctx: dict[str, Any] = {"page": page, "pages": PAGES, "version": __version__, "base": st.base.short(),
                           "key_needed": bool(st.api_key)}
    if page == "datasets":
        from dmoe.data.generate import DESCRIPTIONS

        ctx["templates"] = DESCRIPTIONS
        ctx["datasets"] = datasets.list_datasets(ui.data_dir)
        ctx["data_dir"] = str(ui.data_dir)
        ctx["max_upload_mb"] = ui.max_upload_bytes / 1024 / 1024
    elif page == "train":
        ctx["groups"] = form_groups()
        ctx["datasets"] = [d["name"] for d in datasets.list_datasets(ui.data_dir)]
        ctx["runs"] = _queue(request).list()
    elif page == "experts":
        ctx["experts"] = _experts(st, ui)
    elif page == "playground":
        ctx["models"] = ["auto", "base", *sorted(st.names())]
    return templates.TemplateResponse(request, f"{page}.html", ctx)


# ------------------------------------------------------------------ datasets
@router.get("/ui/api/datasets")
async def list_datasets(request: Request) -> list[dict]:
    return datasets.list_datasets(_ui(request).data_dir)


@router.post(UPLOAD_PATH)
async def upload_dataset(request: Request, name: str = Query(..., description="the dataset's name in dataset_info.json"),
                         filename: str = Query(..., description="the uploaded file's name (.json or .jsonl)"),
                         formatting: str | None = Query(None, description="alpaca or sharegpt (default: guessed)"),
                         replace: bool = Query(False)) -> dict:
    """The body is the file itself (at most ``--max-upload-mb``); validated whole, then stored and registered."""
    require_key(_st(request), request)
    raw = await request.body()
    return await asyncio.to_thread(datasets.save_upload, _ui(request).data_dir, name, raw, filename, formatting, replace)


@router.get("/ui/api/datasets/templates")
async def dataset_templates() -> dict[str, str]:
    """The bundled domains a dataset can be generated from, with their descriptions."""
    from dmoe.data.generate import DESCRIPTIONS

    return DESCRIPTIONS


@router.post("/ui/api/datasets/generate")
async def generate_dataset(request: Request) -> dict:
    """``{"domain": "cooking", "name": "cooking", "rows": 200, "seed": 0, "replace": false}``: a dataset
    from the bundled templates, stored and registered (its held-out questions go to heldout.jsonl)."""
    require_key(_st(request), request)
    body = await _json_object(request)
    unknown = set(body) - {"domain", "name", "rows", "seed", "replace"}
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(sorted(unknown))}; expected domain, name, rows, seed, replace")
    domain, name = body.get("domain"), body.get("name") or body.get("domain")
    rows, seed = body.get("rows", 200), body.get("seed", 0)
    if not isinstance(domain, str) or not isinstance(name, str):
        raise RequestError("'domain' (a bundled domain) is required; 'name' defaults to it")
    if not isinstance(rows, int) or isinstance(rows, bool) or not 10 <= rows <= 540:
        raise RequestError(f"'rows' must be a whole number from 10 to 540, not {rows!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RequestError(f"'seed' must be a whole number, not {seed!r}")
    return await asyncio.to_thread(datasets.generate_bundled, _ui(request).data_dir, domain, name, rows, seed,
                                   replace=bool(body.get("replace", False)))


@router.get("/ui/api/datasets/{name}")
async def preview_dataset(request: Request, name: str, limit: int = Query(20, ge=1, le=200)) -> dict:
    datasets.check_name(name)
    tok = getattr(_st(request), "tokenizer", None)
    return await asyncio.to_thread(datasets.preview, _ui(request).data_dir, name, tok, limit)


# ------------------------------------------------------------------ training
@router.get("/ui/api/train/form")
async def train_form() -> list[dict]:
    """Every training key, grouped, with its default (the bundled recipe's where it sets one) and help."""
    return form_groups()


@router.post("/ui/api/train/yaml", response_class=PlainTextResponse)
async def train_yaml(request: Request) -> str:
    """The YAML that ``dmoe train`` would run for these form values (validated, nothing started)."""
    values = await _json_object(request)
    ui = _ui(request)
    return config_yaml(check_config(values, ui.experts_root, ui.data_dir))


@router.post("/ui/api/runs")
async def start_run(request: Request) -> dict:
    require_key(_st(request), request)
    values = await _json_object(request)
    run = await asyncio.to_thread(_queue(request).submit, values)
    return _queue(request).progress(run.id)


@router.get("/ui/api/runs")
async def list_runs(request: Request) -> list[dict]:
    return _queue(request).list()


@router.get("/ui/api/runs/{run_id}")
async def run_progress(request: Request, run_id: str) -> dict:
    return _queue(request).progress(run_id)


@router.post("/ui/api/runs/{run_id}/stop")
async def stop_run(request: Request, run_id: str) -> dict:
    require_key(_st(request), request)
    await asyncio.to_thread(_queue(request).stop, run_id)
    return _queue(request).progress(run_id)


@router.post("/ui/api/runs/{run_id}/resume")
async def resume_run(request: Request, run_id: str) -> dict:
    require_key(_st(request), request)
    _queue(request).resume(run_id)
    return _queue(request).progress(run_id)


@router.get("/ui/api/runs/{run_id}/config", response_class=PlainTextResponse)
async def run_config(request: Request, run_id: str) -> PlainTextResponse:
    run = _queue(request).get(run_id)
    return PlainTextResponse(Path(run.config).read_text(), headers={
        "content-disposition": f'attachment; filename="{run.name}.yaml"'})


@router.get("/ui/api/runs/{run_id}/events")
async def run_events(request: Request, run_id: str, interval: float = Query(1.0, ge=0.1, le=10)) -> StreamingResponse:
    """Server-sent events: the run's progress (as ``GET /ui/api/runs/{id}``) whenever it changes,
    until the run ends (then one last event and ``event: end``)."""
    q = _queue(request)
    q.get(run_id)

    async def events():
        last, waited = None, 0.0
        while waited < EVENTS_MAX_S:
            snap = q.progress(run_id)
            text = json.dumps(snap)
            if text != last:
                yield f"data: {text}\n\n"
                last = text
            if snap["state"] not in ("queued", "running"):
                yield "event: end\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(interval)
            waited += interval

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


# ------------------------------------------------------------------ experts
def _bench_results(ui: WebUIConfig) -> dict[str, dict]:
    """expert -> its newest benchmark from this UI: hits in its own domain against vanilla's, and the report."""
    out: dict[str, dict] = {}
    for path in sorted((ui.runs_dir / "bench").glob("*/summary.json")):  # run ids sort by time
        summary = _json_or_none(path) or {}
        modes = summary.get("modes", {})
        for mode, m in modes.items():
            if not mode.startswith("expert:"):
                continue
            name = mode.removeprefix("expert:")
            hits = m.get("hits", {})
            vanilla = modes.get("vanilla", {}).get("hits", {})
            domain = next(iter(hits)) if len(hits) == 1 else None
            out[name] = {"run": path.parent.name, "report": f"/ui/api/bench/{path.parent.name}/report",
                         "hits": {d: [r.get("hits"), r.get("n")] for d, r in hits.items()},
                         "vanilla": {d: [r.get("hits"), r.get("n")] for d, r in vanilla.items()},
                         "bleed": [m.get("bleed", {}).get("hits"), m.get("bleed", {}).get("n")], "domain": domain}
    return out


def _experts(st: ApiState, ui: WebUIConfig) -> list[dict]:
    loaded = st.names()
    bench = _bench_results(ui)
    out = []
    for e in find_experts_in(st.roots):
        summary = _json_or_none(e.path / "summary.json")
        card = e.card.model_dump(exclude_none=True)
        data = e.card.training.get("dataset", [])
        out.append({"name": e.name, "path": str(e.path), "card": card, "summary": summary,
                    "data": ", ".join(data) if isinstance(data, list) else str(data), "bench": bench.get(e.name),
                    "loaded": e.name in loaded, "scale": st.defaults.get(e.name),
                    "compatible": e.base.sha256 == st.base.sha256,
                    "gguf": sorted(p.name for p in e.path.glob("*.gguf"))})
    return sorted(out, key=lambda d: d["name"])


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@router.get("/ui/api/experts")
async def list_experts(request: Request) -> list[dict]:
    """Every expert under the server's roots (loaded or not), with its card and training summary."""
    return await asyncio.to_thread(_experts, _st(request), _ui(request))


@router.get("/ui/api/experts/{name}/loss")
async def expert_loss(request: Request, name: str) -> dict:
    e = resolve_expert(name, _st(request).roots)
    from dmoe.train.progress import read_log

    rows = read_log(e.path)
    return {"loss": [[r["step"], r["loss"]] for r in rows if "loss" in r],
            "eval_loss": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]}


@router.post("/ui/api/experts/{name}/gguf")
async def export_gguf(request: Request, name: str, outtype: str = Query("f16", pattern="^(f32|f16|bf16|q8_0)$")) -> dict:
    """Write the expert as a llama.cpp LoRA GGUF next to it (``dmoe export NAME``)."""
    st = _st(request)
    require_key(st, request)
    e = resolve_expert(name, st.roots)

    def run() -> dict:
        from dmoe.base import resolve_base
        from dmoe.experts import check_base
        from dmoe.export.gguf import write_adapter_gguf

        spec = resolve_base(_ui(request).base)
        check_base(e, spec.identity)
        report = write_adapter_gguf(e, e.path / f"{e.name}-{outtype}.gguf", spec, outtype)
        return {"name": e.name, "file": Path(report.path).name, "tensors": report.tensors,
                "bytes": Path(report.path).stat().st_size, "download": f"/ui/api/experts/{e.name}/gguf/{Path(report.path).name}"}

    return await asyncio.to_thread(run)


@router.get("/ui/api/experts/{name}/gguf/{file}")
async def download_gguf(request: Request, name: str, file: str) -> FileResponse:
    e = resolve_expert(name, _st(request).roots)
    path = e.path / file
    if not file.endswith(".gguf") or "/" in file or not path.is_file():
        raise NotFoundError(f"expert {name} has no GGUF file {file!r}; export it first (POST /ui/api/experts/{name}/gguf)")
    if not within_roots(path, _st(request).roots):
        raise OutsideRootsError(f"{file} lies outside the expert roots")
    return FileResponse(path, filename=file, media_type="application/octet-stream")


# ------------------------------------------------------------------ benchmark
@router.post("/ui/api/bench")
async def start_bench(request: Request) -> dict:
    """``{"experts": ["cooking"], "limit": 8}``: ``dmoe bench`` against this server (vanilla, each
    expert, auto) on the data folder's held-out questions; one at a time."""
    st, ui = _st(request), _ui(request)
    require_key(st, request)
    body = await _json_object(request)
    unknown = set(body) - {"experts", "limit"}
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(sorted(unknown))}; expected experts, limit")
    names, limit = body.get("experts"), body.get("limit", 8)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RequestError("'experts' must be a non-empty list of loaded expert names")
    missing = [n for n in names if n not in st.names()]
    if missing:
        raise RequestError(f"not loaded: {', '.join(missing)}; load them first (loaded: {', '.join(sorted(st.names())) or 'none'})")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100:
        raise RequestError(f"'limit' (questions per domain) must be a whole number from 1 to 100, not {limit!r}")
    questions = ui.data_dir / "heldout.jsonl"
    assert ui.bench is not None
    url = str(request.base_url).rstrip("/")
    modes = ["vanilla", *(f"expert:{n}" for n in names), "auto"]
    return await asyncio.to_thread(ui.bench.start, url, ui.experts_root, questions, modes, limit)


@router.get("/ui/api/bench/{run_id}")
async def bench_status(request: Request, run_id: str) -> dict:
    assert _ui(request).bench is not None
    return _ui(request).bench.get(run_id)  # type: ignore[union-attr]


@router.get("/ui/api/bench/{run_id}/report", response_class=HTMLResponse)
async def bench_report(request: Request, run_id: str) -> FileResponse:
    assert _ui(request).bench is not None
    return FileResponse(_ui(request).bench.report(run_id), media_type="text/html")  # type: ignore[union-attr]


async def _json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object of training keys")
    return body


