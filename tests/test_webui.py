"""The web UI's endpoints on a live server over the tiny model: dataset upload (validated,
stored, registered, previewed), training runs in a child process (progress over SSE, stop,
resume, a queue), expert cards, GGUF export and download, and the refusals: oversized and
malformed uploads, names that climb out of the data folder, a missing API key, a request
from another site's page. Each refusal leaves the folders as they were."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from dmoe.webui import WebUIConfig, mount

KEY = "s3cret"
GOOD = [{"instruction": f"How do I fix thing {i}?", "input": "", "output": f"Use the right tool, number {i}."} for i in range(12)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


@pytest.fixture
def ui_server(make_state, live_server, tiny_experts, tiny_base, tmp_path):
    """A server with the web UI: its own experts root (alpha copied in) and data folder."""
    servers = []

    def start(api_key: str | None = None, max_upload_bytes: int = 50 * 1024 * 1024):
        experts = tmp_path / "experts"
        if not experts.exists():
            shutil.copytree(tiny_experts / "alpha", experts / "alpha")
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        ui = WebUIConfig(data_dir=data, experts_root=experts, runs_dir=tmp_path / "runs", base=str(tiny_base),
                         max_upload_bytes=max_upload_bytes)
        st = make_state(experts, api_key=api_key)
        srv = live_server(st, mount=mount(ui)).__enter__()
        servers.append((srv, ui))
        return srv.url, ui

    yield start
    for srv, ui in servers:
        if ui.queue is not None:
            ui.queue.close()
        srv.__exit__(None, None, None)


def upload(url, name, raw, filename="d.jsonl", key=None, **params):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/ui/api/datasets", params={"name": name, "filename": filename, **params}, content=raw,
                      headers=headers, timeout=60)


def test_an_upload_is_validated_stored_registered_and_previewed_with_token_counts(ui_server, tiny_base):
    url, ui = ui_server()
    r = upload(url, "fixes", jsonl(GOOD))
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "fixes", "file_name": "fixes.jsonl", "formatting": "alpaca", "rows": 12}
    assert (ui.data_dir / "fixes.jsonl").read_bytes() == jsonl(GOOD)
    assert json.loads((ui.data_dir / "dataset_info.json").read_text())["fixes"] == {"file_name": "fixes.jsonl",
                                                                                  "formatting": "alpaca"}
    listed = httpx.get(f"{url}/ui/api/datasets").json()
    assert [d["name"] for d in listed] == ["fixes"] and listed[0]["exists"]
    p = httpx.get(f"{url}/ui/api/datasets/fixes", params={"limit": 3}).json()
    assert p["total"] == 12 and len(p["rows"]) == 3
    assert p["rows"][0]["turns"] == [["How do I fix thing 0?", "Use the right tool, number 0."]]
    # the count is the row's tokens under the base's chat template, as training sees it
    from dmoe.base import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base(str(tiny_base)))
    first = [{"role": "user", "content": GOOD[0]["instruction"]}, {"role": "assistant", "content": GOOD[0]["output"]}]
    text = tok.apply_chat_template(first, tokenize=False)
    assert p["rows"][0]["tokens"] == len(tok.encode(text, add_special_tokens=False)) > 10
    assert httpx.get(f"{url}/ui/api/datasets/nothing").status_code == 404
    # a ShareGPT file is recognised by its rows; the same name again is refused unless replaced
    share = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    r = upload(url, "chat", json.dumps(share).encode(), filename="chat.json")
    assert r.status_code == 200 and r.json()["formatting"] == "sharegpt"
    assert upload(url, "chat", json.dumps(share).encode(), filename="chat.json").status_code == 400
    assert upload(url, "chat", json.dumps(share).encode(), filename="chat.json", replace="true").status_code == 200


def test_a_bad_row_is_refused_with_its_line_and_field_and_nothing_is_written(ui_server):
    url, ui = ui_server()
    before = snapshot(ui.data_dir)
    rows = GOOD[:4] + [{"instruction": "no answer here"}] + GOOD[4:]
    r = upload(url, "broken", jsonl(rows), filename="broken.jsonl")
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "broken.jsonl:5" in msg and "missing field 'output'" in msg, msg
    r = upload(url, "broken", b'{"instruction": "a", "output": "b"}\n{not json\n', filename="broken.jsonl")
    assert r.status_code == 400 and "broken.jsonl" in r.json()["error"]["message"] and "line 2" in r.json()["error"]["message"]
    assert upload(url, "binary", b"\xff\xfe\x00", filename="b.jsonl").status_code == 400
    r = upload(url, "notes", b"hello", filename="notes.txt")
    assert r.status_code == 400 and ".jsonl" in r.json()["error"]["message"]
    r = upload(url, "empty", b"", filename="e.jsonl")
    assert r.status_code == 400
    assert snapshot(ui.data_dir) == before


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", ".hidden", "x" * 65, "", "a\\b"])
def test_a_name_that_leaves_the_data_folder_is_refused(ui_server, tmp_path, name):
    url, ui = ui_server()
    r = upload(url, name, jsonl(GOOD))
    assert r.status_code == 400, r.text
    assert not any(tmp_path.glob("*.jsonl")) and not (ui.data_dir / "dataset_info.json").exists()
    assert not list(ui.data_dir.rglob("*.jsonl"))


def test_a_link_out_of_the_roots_is_never_written_through(ui_server, tmp_path, tiny_base):
    url, ui = ui_server()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.jsonl").write_text("keep\n")
    (ui.data_dir / "victim.jsonl").symlink_to(outside / "victim.jsonl")
    r = upload(url, "victim", jsonl(GOOD), filename="victim.jsonl")
    assert r.status_code == 400 and "link" in r.json()["error"]["message"]
    (ui.experts_root / "escape").symlink_to(outside, target_is_directory=True)
    upload(url, "fixes", jsonl(GOOD))
    r = httpx.post(f"{url}/ui/api/runs", json=run_values(tiny_base, "escape", max_steps=2), timeout=60)
    assert r.status_code == 400 and "link" in r.json()["error"]["message"]
    assert sorted(p.name for p in outside.iterdir()) == ["victim.jsonl"]
    assert (outside / "victim.jsonl").read_text() == "keep\n"


def test_an_oversized_upload_is_refused_unread(ui_server):
    url, ui = ui_server(max_upload_bytes=1000)
    r = upload(url, "big", jsonl(GOOD * 10))
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]["message"]
    assert not list(ui.data_dir.iterdir())
    assert upload(url, "small", jsonl(GOOD[:3])).status_code == 200  # the server still serves


def test_script_in_a_row_or_a_card_renders_as_text(ui_server):
    url, ui = ui_server()
    evil = "<script>alert(1)</script>"
    assert upload(url, "evil", jsonl([{"instruction": evil, "output": evil}])).status_code == 200
    # the preview is data (JSON); the page shows it with textContent, never as markup
    assert httpx.get(f"{url}/ui/api/datasets/evil").json()["rows"][0]["turns"] == [[evil, evil]]
    card = ui.experts_root / "alpha" / "expert.yaml"
    card.write_text(card.read_text().replace("name: alpha", f"name: alpha\ndescription: '{evil}'", 1))
    page = httpx.get(f"{url}/ui/experts").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and evil not in page
    js = httpx.get(f"{url}/ui/static/app.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js


def test_every_state_change_needs_the_key_and_nothing_is_written_without_it(ui_server, tiny_base):
    url, ui = ui_server(api_key=KEY)
    before = snapshot(ui.data_dir, ui.experts_root)
    assert upload(url, "fixes", jsonl(GOOD)).status_code == 401
    assert httpx.post(f"{url}/ui/api/runs", json={"expert_name": "x", "dataset": "fixes"}).status_code == 401
    assert httpx.post(f"{url}/ui/api/experts/alpha/gguf").status_code == 401
    assert httpx.post(f"{url}/ui/api/runs/nope/stop").status_code == 401
    assert snapshot(ui.data_dir, ui.experts_root) == before
    assert not (ui.runs_dir / "runs.json").exists()
    assert httpx.get(f"{url}/ui/datasets").status_code == 200  # reading needs no key
    assert upload(url, "fixes", jsonl(GOOD), key=KEY).status_code == 200


def test_a_state_change_from_another_sites_page_is_refused(ui_server):
    url, ui = ui_server()
    evil = {"Origin": "http://evil.example"}
    r = httpx.post(f"{url}/ui/api/datasets", params={"name": "x", "filename": "x.jsonl"}, content=jsonl(GOOD), headers=evil)
    assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/experts", json={"path": str(ui.experts_root / "alpha")}, headers=evil).status_code == 403
    assert httpx.delete(f"{url}/v1/experts/alpha", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert not list(ui.data_dir.iterdir())
    host = url.removeprefix("http://")
    ok = upload(url, "x", jsonl(GOOD))  # no Origin: not a browser
    assert ok.status_code == 200
    same = httpx.post(f"{url}/ui/api/datasets", params={"name": "y", "filename": "y.jsonl"}, content=jsonl(GOOD),
                      headers={"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200
    # reading is not a state change: a chat from anywhere is judged by the key and CORS alone
    assert httpx.get(f"{url}/ui/api/datasets", headers=evil).status_code == 200


def test_the_training_form_has_every_key_with_help_and_refuses_what_the_cli_refuses(ui_server, tiny_base):
    from dmoe.config import TrainConfig
    from dmoe.webui.forms import SET_BY_UI

    url, ui = ui_server()
    groups = httpx.get(f"{url}/ui/api/train/form").json()
    keys = [f["key"] for g in groups for f in g["fields"]]
    assert sorted(keys + list(SET_BY_UI)) == sorted(TrainConfig.model_fields)
    assert all(f["help"] for g in groups for f in g["fields"])
    defaults = {f["key"]: f["default"] for g in groups for f in g["fields"]}
    assert defaults["lora_rank"] == 16 and defaults["learning_rate"] == 2e-4  # the bundled recipe's
    page = httpx.get(f"{url}/ui/train").text
    assert all(f'name="{k}"' in page for k in keys)
    upload(url, "fixes", jsonl(GOOD))
    ok = httpx.post(f"{url}/ui/api/train/yaml", json={"expert_name": "fixer", "dataset": "fixes", "lora_rank": 4,
                                                      "model_name_or_path": str(tiny_base)})
    assert ok.status_code == 200
    import yaml

    y = yaml.safe_load(ok.text)
    assert y["lora_rank"] == 4 and y["output_dir"] == str(ui.experts_root / "fixer") and y["dataset_dir"] == str(ui.data_dir)
    bad = httpx.post(f"{url}/ui/api/train/yaml", json={"expert_name": "fixer", "dataset": "fixes", "lora_rank": 0})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "train config: lora_rank: Input should be greater than or equal to 1"
    typo = httpx.post(f"{url}/ui/api/train/yaml", json={"expert_name": "fixer", "dataset": "fixes", "lora_rnk": 4})
    assert "did you mean 'lora_rank'" in typo.json()["error"]["message"]
    out = httpx.post(f"{url}/ui/api/train/yaml", json={"expert_name": "fixer", "dataset": "fixes", "output_dir": "/tmp/x"})
    assert out.status_code == 400 and "output_dir" in out.json()["error"]["message"]
    climb = httpx.post(f"{url}/ui/api/runs", json={"expert_name": "../fixer", "dataset": "fixes"})
    assert climb.status_code == 400
    missing = httpx.post(f"{url}/ui/api/runs", json={"expert_name": "fixer", "dataset": "nowhere"})
    assert missing.status_code == 400 and "nowhere" in missing.json()["error"]["message"]
    assert not (ui.experts_root / "fixer").exists()


def events(url: str, run_id: str, limit_s: float = 240) -> list[dict]:
    """Every progress event of a run until it ends (bounded by ``limit_s``)."""
    out = []
    with httpx.stream("GET", f"{url}/ui/api/runs/{run_id}/events", params={"interval": 0.2}, timeout=limit_s) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: {}":
                out.append(json.loads(line[6:]))
            if line == "event: end":
                break
    return out


def wait_state(url, run_id, states, limit_s=240) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        p = httpx.get(f"{url}/ui/api/runs/{run_id}").json()
        if p["state"] in states:
            return p
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not reach {states}: {p}")


def run_values(tiny_base, name, **kw) -> dict:
    return {"expert_name": name, "dataset": "fixes", "model_name_or_path": str(tiny_base), "lora_rank": 4,
            "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 2,
            "cutoff_len": 64, "bf16": False, "val_size": 0, **kw}


@pytest.mark.slow
def test_a_run_streams_its_loss_then_the_expert_loads_serves_and_exports_to_gguf(ui_server, tiny_base):
    url, ui = ui_server()
    upload(url, "fixes", jsonl(GOOD))
    r = httpx.post(f"{url}/ui/api/runs", json=run_values(tiny_base, "fixer", max_steps=6), timeout=60)
    assert r.status_code == 200, r.text
    run = r.json()
    # a second run while one trains waits in the queue
    r2 = httpx.post(f"{url}/ui/api/runs", json=run_values(tiny_base, "fixer2", max_steps=2), timeout=60).json()
    assert r2["state"] == "queued"
    seen = events(url, run["id"])
    assert seen[-1]["state"] == "done", seen[-1]
    counts = [len(e["loss"]) for e in seen]
    assert counts == sorted(counts) and counts[-1] == 6 and len(set(counts)) > 1  # the curve gained points live
    assert seen[-1]["total_steps"] == 6 and seen[-1]["step"] == 6
    assert any(e["state"] == "running" for e in seen)
    assert wait_state(url, r2["id"], ("done", "failed"))["state"] == "done"
    # a reload (a new client) finds both runs
    assert {x["id"] for x in httpx.get(f"{url}/ui/api/runs").json()} == {run["id"], r2["id"]}
    cfg = httpx.get(f"{url}/ui/api/runs/{run['id']}/config")
    assert "expert_name: fixer" in cfg.text and "attachment" in cfg.headers["content-disposition"]

    experts = {e["name"]: e for e in httpx.get(f"{url}/ui/api/experts").json()}
    assert experts["fixer"]["summary"]["steps"] == 6 and not experts["fixer"]["loaded"] and experts["fixer"]["compatible"]
    assert len(httpx.get(f"{url}/ui/api/experts/fixer/loss").json()["loss"]) == 6
    loaded = httpx.post(f"{url}/v1/experts", json={"path": experts["fixer"]["path"]}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "fixer", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "How do I fix thing 3?"}]},
                      timeout=60)
    assert chat.status_code == 200
    assert "fixer" in httpx.get(f"{url}/ui/experts").text

    g = httpx.post(f"{url}/ui/api/experts/fixer/gguf", timeout=120)
    assert g.status_code == 200, g.text
    body = httpx.get(f"{url}{g.json()['download']}", timeout=60)
    path = ui.experts_root / "fixer" / g.json()["file"]
    assert body.status_code == 200 and body.content == path.read_bytes() and body.content[:4] == b"GGUF"
    from dmoe.lora_gguf import read_gguf_info

    info = read_gguf_info(path)
    assert info.kind == "adapter" and info.adapter_type == "lora" and len(info.shapes) == g.json()["tensors"] > 0
    assert httpx.get(f"{url}/ui/api/experts/fixer/gguf/..%2Fexpert.yaml").status_code == 404
    assert httpx.get(f"{url}/ui/api/experts/fixer/gguf/nothing.gguf").status_code == 404


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_checkpoint(ui_server, tiny_base):
    url, ui = ui_server()
    upload(url, "fixes", jsonl(GOOD * 4))
    run = httpx.post(f"{url}/ui/api/runs", json=run_values(tiny_base, "longer", max_steps=400), timeout=60).json()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until a checkpoint exists (every 2 steps)
        p = httpx.get(f"{url}/ui/api/runs/{run['id']}").json()
        if (p["step"] or 0) >= 4:
            break
        time.sleep(0.2)
    stopped = httpx.post(f"{url}/ui/api/runs/{run['id']}/stop", timeout=60).json()
    assert stopped["state"] == "stopped" and 4 <= stopped["step"] < 400
    assert list((ui.experts_root / "longer").glob("checkpoint-*"))
    assert httpx.post(f"{url}/ui/api/runs/{run['id']}/stop").status_code == 409  # not running any more
    resumed = httpx.post(f"{url}/ui/api/runs/{run['id']}/resume").json()
    assert resumed["state"] in ("queued", "running")
    p = wait_state(url, run["id"], ("running",))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (Path(p["config"]).parent / "status.json").exists():
        time.sleep(0.1)
    status = json.loads((Path(p["config"]).parent / "status.json").read_text())
    assert status["resumed_from"] is not None and status["resumed_from"] >= 4
    httpx.post(f"{url}/ui/api/runs/{run['id']}/stop", timeout=60)
    assert httpx.get(f"{url}/ui/api/runs/nope").status_code == 404


def test_a_dataset_is_generated_from_the_bundled_templates_with_its_heldout_questions(ui_server):
    url, ui = ui_server(api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{url}/ui/api/datasets/generate", json={"domain": "cooking"}).status_code == 401
    assert "cooking" in httpx.get(f"{url}/ui/api/datasets/templates").json()
    r = httpx.post(f"{url}/ui/api/datasets/generate", json={"domain": "cooking", "name": "cook", "rows": 20}, headers=auth)
    assert r.status_code == 200, r.text
    from dmoe.data.generate import training_samples

    assert r.json()["rows"] == len(training_samples("cooking", 0, n_domain=20))
    rows = [json.loads(line) for line in (ui.data_dir / "cook.jsonl").read_text().splitlines()]
    assert sum(row["domain"] == "cooking" for row in rows) >= 20
    held = [json.loads(line) for line in (ui.data_dir / "heldout.jsonl").read_text().splitlines()]
    assert {h["domain"] for h in held} == {"cooking", "none"} and r.json()["heldout_added"] == len(held)
    again = httpx.post(f"{url}/ui/api/datasets/generate", json={"domain": "cooking", "name": "cook2", "rows": 20}, headers=auth)
    assert again.json()["heldout_added"] == 0  # no duplicates
    before = snapshot(ui.data_dir)
    for bad in ({"domain": "astrology"}, {"domain": "cooking", "rows": 5}, {"domain": "cooking", "rows": "many"},
                {"domain": "cooking", "name": "../x"}, {"domain": "cooking", "colour": "red"}):
        r = httpx.post(f"{url}/ui/api/datasets/generate", json=bad, headers=auth)
        assert r.status_code == 400, (bad, r.text)
    assert snapshot(ui.data_dir) == before


@pytest.mark.slow
def test_a_benchmark_runs_against_this_server_and_opens_its_report(ui_server):
    url, ui = ui_server()
    assert httpx.post(f"{url}/ui/api/bench", json={"experts": ["alpha"]}).status_code == 400  # no held-out questions yet
    httpx.post(f"{url}/ui/api/datasets/generate", json={"domain": "cooking", "rows": 20})
    assert httpx.post(f"{url}/ui/api/bench", json={"experts": ["nobody"]}).status_code == 400
    unknown = httpx.post(f"{url}/ui/api/bench", json={"experts": ["alpha"], "modes": "vanilla"})
    assert unknown.status_code == 400 and "modes" in unknown.json()["error"]["message"]
    r = httpx.post(f"{url}/ui/api/bench", json={"experts": ["alpha"], "limit": 1})
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["modes"] == ["vanilla", "expert:alpha", "auto"]
    assert httpx.post(f"{url}/ui/api/bench", json={"experts": ["alpha"], "limit": 1}).status_code == 409  # one at a time
    deadline = time.monotonic() + 240
    while run["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        run = httpx.get(f"{url}/ui/api/bench/{run['id']}").json()
    assert run["state"] == "done", run["log_tail"]
    assert set(run["summary"]["modes"]) == {"vanilla", "expert:alpha", "auto"}
    report = httpx.get(f"{url}{run['report']}")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html") and "expert:alpha" in report.text
    assert httpx.get(f"{url}/ui/api/bench/nope/report").status_code == 404
    # the expert's card shows its newest benchmark
    card = {e["name"]: e for e in httpx.get(f"{url}/ui/api/experts").json()}["alpha"]["bench"]
    assert card["run"] == run["id"] and card["report"] == run["report"]
    assert card["hits"] == {d: [r["hits"], r["n"]] for d, r in run["summary"]["modes"]["expert:alpha"]["hits"].items()}
    assert f'href="{run["report"]}"' in httpx.get(f"{url}/ui/experts").text


def test_dmoe_serve_webui_serves_the_pages_beside_the_api(tiny_base, tiny_experts, tmp_path, dmoe_home):
    """The CLI wiring: ``dmoe serve --webui`` (``dmoe webui`` is the same on port 8082)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import unused_port

    port = unused_port()
    experts = tmp_path / "experts"
    shutil.copytree(tiny_experts / "alpha", experts / "alpha")
    proc = subprocess.Popen([sys.executable, "-m", "dmoe.cli", "serve", "--webui", "--base", str(tiny_base), "--experts",
                             str(experts), "--data-dir", str(tmp_path / "data"), "--port", str(port), "--max-seq", "128"],
                            env={**os.environ, "DMOE_HOME": str(dmoe_home)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/ui/playground").status_code == 200
        assert "alpha" in httpx.get(f"{url}/v1/models").text
        assert httpx.get(f"{url}/", follow_redirects=False).headers["location"] == "/ui/playground"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert f"web UI: {url}/ui/" in out
    help_text = subprocess.run([sys.executable, "-m", "dmoe.cli", "webui", "--help"], capture_output=True, text=True).stdout
    assert "8082" in help_text and "--max-upload-mb" in help_text
