"""Schemathesis against a live server on the tiny model (a small seeded budget; the full run
is bench/api_fuzz.py): positive and negative data and the stateful links, with no 5xx, no
response outside the schema, the server healthy afterwards, and no expert loaded or file
written by any request."""

import importlib.util
import shutil
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "api_fuzz.py"


def _bench():
    spec = importlib.util.spec_from_file_location("api_fuzz", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_api_survives_schemathesis(make_state, tiny_experts, live_server, tmp_path):
    bench = _bench()
    experts = tmp_path / "experts"
    shutil.copytree(tiny_experts, experts)
    spare = tmp_path / "spare"
    bench.spare_expert(experts / "alpha", spare)
    st = make_state(experts, roots=[spare], max_queue=256, api_key="fuzz-key")
    with live_server(st) as srv:
        result = bench.fuzz(srv.url, [experts, spare], "fuzz-key", examples=8, seed=0, report_dir=tmp_path / "report")
    failed = bench.goals(result, min_requests=300, known={"alpha", "beta", "gamma", "alpha-spare"})
    assert failed == [], (failed, result["with_key"]["summary"][-3000:], result["without_key"]["summary"][-3000:])
    assert result["without_key"]["statuses"].get("401", 0) > 0  # the refused run was refused for the key
