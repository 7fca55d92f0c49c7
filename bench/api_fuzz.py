"""API fuzzing with Schemathesis against a live ``dmoe serve``: positive and negative data,
every check Schemathesis has that applies, and its stateful phase (the OpenAPI links: load
an expert, use it, unload it).

    .venv/bin/python bench/api_fuzz.py --examples 100 --seed 0 > docs/api_fuzz.json

Starts a server on the embedded base (or ``--base``) with the bundled experts and one more
expert in a root that is not loaded (for the stateful phase to load), runs ``st run`` as a
subprocess, then checks the server afterwards: still healthy, the same experts loaded as
before, and no file written under the expert roots. Prints one JSON object; exit 1 when any
goal fails. ``tests/test_api_fuzz.py`` runs :func:`fuzz` with a small seeded budget on a
tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# Checks that apply to this API (ignored_auth is added to the run without the key). Not run:
# positive_data_acceptance (a schema-valid request may still name an unknown model or an
# expert path outside the roots: 404/403 are right), missing_required_header (none is
# required), object_level_authorization (one key, no per-object owners).
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,negative_data_rejection,unsupported_method,use_after_free,"
          "ensure_resource_availability")


def tree_state(roots: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file under ``roots``: (size, mtime_ns), to prove nothing was written."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                s = p.stat()
                out[str(p)] = (s.st_size, s.st_mtime_ns)
    return out


def spare_expert(src: Path, root: Path, suffix: str = "spare") -> Path:
    """A copy of expert ``src`` named '<name>-<suffix>' under ``root`` (here: in a root, not
    loaded, so the stateful phase has an expert to load, use and unload)."""
    import yaml

    card = yaml.safe_load((src / "expert.yaml").read_text())
    card["name"] = f"{card['name']}-{suffix}"
    dst = root / card["name"]
    shutil.copytree(src, dst)
    (dst / "expert.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return dst


def run_st(url: str, report_dir: Path, *, checks: str, examples: int, seed: int, workers: int = 1,
           max_time: float | None = None, headers: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One ``st run``; its exit code, response counts and output (also in report_dir/schemathesis.txt)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json", "--checks", checks, "--mode", "all",
           "--max-examples", str(examples), "--seed", str(seed), "--workers", str(workers), "--no-color",
           "--generation-database", "none", "--request-timeout", "120", "--suppress-health-check", "all",
           "--report", "ndjson,junit", "--report-dir", str(report_dir), *extra]
    if max_time:
        cmd += ["--max-time", str(int(max_time))]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    (report_dir / "schemathesis.txt").write_text(proc.stdout + "\n" + proc.stderr)
    statuses, requests = count_responses(report_dir)
    return {"exit": proc.returncode, "requests": requests, "statuses": statuses,
            "server_errors": sum(n for s, n in statuses.items() if int(s) >= 500),
            "wall_s": round(time.perf_counter() - t0, 1), "summary": tail(proc.stdout, 400)}


def loaded(url: str) -> list[str]:
    return sorted(e["name"] for e in httpx.get(f"{url}/v1/experts").json()["experts"])


def fuzz(url: str, roots: list[Path], api_key: str, *, examples: int, seed: int, workers: int = 1,
         max_time: float | None = None, report_dir: Path) -> dict:
    """Two runs against a server that has ``api_key``:

    * ``without_key`` first: the state-changing operations without the key, so every request
      is refused: the loaded experts must not change (no adapter loaded or unloaded by a
      rejected request).
    * ``with_key``: every operation, with the key, all four phases (the stateful one loads the
      spare expert, uses it, unloads it); every check that applies.

    Then the server must be healthy, and no file under ``roots`` written by either run."""
    files_before = tree_state(roots)
    names_before = loaded(url)
    without_key = run_st(url, report_dir / "without_key", checks=CHECKS + ",ignored_auth", examples=examples, seed=seed,
                         workers=workers, max_time=max_time, extra=(
                             "--exclude-method", "GET", "--exclude-path-regex", "^/v1/(chat/)?completions$"))
    names_between = loaded(url)
    with_key = run_st(url, report_dir / "with_key", checks=CHECKS, examples=examples, seed=seed, workers=workers,
                      max_time=max_time, headers={"Authorization": f"Bearer {api_key}"})
    health = httpx.get(f"{url}/health")
    return {
        "with_key": with_key, "without_key": without_key,
        "requests": with_key["requests"] + without_key["requests"],
        "server_errors": with_key["server_errors"] + without_key["server_errors"],
        "healthy_after": health.status_code == 200 and health.json()["status"] == "ok",
        "experts_before": names_before, "experts_between": names_between, "experts_after": loaded(url),
        "files_changed": sorted(set(files_before.items()) ^ set(tree_state(roots).items())),
    }


def count_responses(report_dir: Path) -> tuple[dict[str, int], int]:
    """Status counts over every response recorded in Schemathesis's NDJSON event stream."""
    statuses: dict[str, int] = {}
    for f in report_dir.glob("*.ndjson"):
        for line in f.read_text().splitlines():
            for status in _statuses(json.loads(line)):
                statuses[str(status)] = statuses.get(str(status), 0) + 1
    return dict(sorted(statuses.items())), sum(statuses.values())


def _statuses(event) -> list[int]:
    """The status codes of the responses inside one event (they sit in 'interactions' or 'response')."""
    found: list[int] = []

    def walk(x) -> None:
        if isinstance(x, dict):
            resp = x.get("response")
            if isinstance(resp, dict) and isinstance(resp.get("status_code"), int):
                found.append(resp["status_code"])
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(event)
    return found


def tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def goals(result: dict, min_requests: int, known: set[str]) -> list[str]:
    """The issue's goals; an empty list is a pass. ``known``: every expert that may be loaded."""
    failed = []
    if result["requests"] < min_requests:
        failed.append(f"only {result['requests']} requests (goal >= {min_requests})")
    if result["server_errors"]:
        failed.append(f"{result['server_errors']} responses with a 5xx status")
    for run in ("with_key", "without_key"):
        if result[run]["exit"] != 0:
            failed.append(f"Schemathesis found failures in the {run} run (see its summary)")
    if not result["healthy_after"]:
        failed.append("the server is not healthy afterwards")
    if result["experts_before"] != result["experts_between"]:
        failed.append(f"refused requests changed the loaded experts: {result['experts_before']} -> "
                      f"{result['experts_between']}")
    if not set(result["experts_after"]) <= known:
        failed.append(f"an expert outside the roots was loaded: {sorted(set(result['experts_after']) - known)}")
    if result["files_changed"]:
        failed.append(f"files written under the expert roots: {result['files_changed'][:5]}")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="base model (default: the embedded one)")
    ap.add_argument("--experts", type=Path, default=None, help="experts to load (default: the bundled ones)")
    ap.add_argument("--examples", type=int, default=100, help="examples per operation and phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-requests", type=int, default=2000)
    ap.add_argument("--max-time", type=float, default=None)
    args = ap.parse_args()

    from dmoe.paths import examples_dir
    from dmoe.runtime import ServeConfig, build_state
    from dmoe.serve.http import ThreadedServer

    experts = args.experts or examples_dir() / "experts"
    with tempfile.TemporaryDirectory() as tmp:
        spare = Path(tmp) / "spare"
        names = sorted(p.name for p in experts.iterdir() if (p / "expert.yaml").is_file())
        spare_expert(experts / names[0], spare)
        key = secrets.token_urlsafe(16)
        st = build_state(ServeConfig.make(base=args.base, experts_dir=experts, roots=[spare], max_batch=8, max_seq=512,
                                          max_queue=256, refit_router=False, api_key=key))
        known = {*names, *(p.name for p in spare.iterdir())}
        with ThreadedServer(st) as srv:
            result = fuzz(srv.url, [experts, spare], key, examples=args.examples, seed=args.seed,
                          max_time=args.max_time, report_dir=Path(tmp) / "report")
    failed = goals(result, args.min_requests, known)
    print(json.dumps({"bench": "api_fuzz", "machine": platform.node(), "cpu_count": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d"), "examples": args.examples, "seed": args.seed,
                      **result, "goals_failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
