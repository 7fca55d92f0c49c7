"""The web UI in a real browser: Playwright driving Debian's Chromium against a live server
with the web UI on loopback, over the tiny model. One scenario per test step, each with a
screenshot in the test's output folder (``tmp_path``; ``DMOE_WEBUI_SHOTS=DIR`` copies them).

Where Chromium or Playwright is missing these tests skip with the reason; ``make test``
installs both (``apt-get install chromium``; Playwright's own browser download is not used).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

CHROMIUM = os.environ.get("DMOE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
ROWS = [{"instruction": f"How do I fix thing {i}?", "input": "", "output": f"Use the right tool, number {i}."} for i in range(16)]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (make test installs it)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; make test tries it): the browser tests skip",
                allow_module_level=True)


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def site(make_state, live_server, tiny_experts, tiny_base, tmp_path):
    from dmoe.webui import WebUIConfig, mount

    experts = tmp_path / "experts"
    shutil.copytree(tiny_experts / "alpha", experts / "alpha")
    ui = WebUIConfig(data_dir=tmp_path / "data", experts_root=experts, runs_dir=tmp_path / "runs", base=str(tiny_base))
    ui.data_dir.mkdir()
    st = make_state(experts)
    with live_server(st, mount=mount(ui)) as srv:
        yield srv.url, ui
        assert ui.queue is not None
        ui.queue.close()


class Shots:
    def __init__(self, page, folder: Path):
        self.page, self.folder, self.n = page, folder, 0
        self.copy_to = Path(os.environ["DMOE_WEBUI_SHOTS"]) if os.environ.get("DMOE_WEBUI_SHOTS") else None

    def __call__(self, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if self.copy_to is not None:
            self.copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.copy_to / path.name)
        return path


def test_the_whole_workflow_in_a_browser(site, browser, tmp_path, tiny_base):
    url, ui = site
    page = browser.new_page(viewport={"width": 1100, "height": 900}, accept_downloads=True)
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    shots = Shots(page, tmp_path / "shots")

    # 1. upload a dataset, see it validated; a bad row is refused with its line
    good, bad = tmp_path / "fixes.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    bad.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2] + [{"instruction": "no answer"}]))
    page.goto(f"{url}/ui/datasets")
    page.fill("#ds-name", "broken")
    page.set_input_files("#ds-file", str(bad))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-result.error")
    assert "bad.jsonl:3" in page.inner_text("#upload-result") and "missing field 'output'" in page.inner_text("#upload-result")
    shots("dataset-refused")
    page.fill("#ds-name", "fixes")
    page.set_input_files("#ds-file", str(good))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-result.ok")
    assert "16 rows" in page.inner_text("#upload-result")
    page.wait_for_selector("#datasets tr[data-name=fixes]")  # the page reloads with the new dataset
    page.click("button.preview[data-name=fixes]")
    page.wait_for_selector("#preview .tokens")
    assert "How do I fix thing 0?" in page.inner_text("#preview")
    shots("datasets")

    # 2. start a short training run and watch the loss curve gain points
    page.goto(f"{url}/ui/train")
    for key, value in {"expert_name": "fixer", "dataset": "fixes", "model_name_or_path": str(tiny_base), "lora_rank": "4",
                       "per_device_train_batch_size": "4", "learning_rate": "0.01", "logging_steps": "1",
                       "save_steps": "20", "cutoff_len": "64", "val_size": "0", "max_steps": "120"}.items():
        page.fill(f"#train-form [name={key}]", value)
    page.uncheck("#train-form [name=bf16]")
    page.click("#show-yaml")
    page.wait_for_selector("#yaml:not([hidden])")
    assert "expert_name: fixer" in page.inner_text("#yaml")
    page.click("#train-form button[type=submit]")
    page.wait_for_function("() => +document.querySelector('#loss-points').textContent >= 3")
    first = int(page.inner_text("#loss-points"))
    page.wait_for_function(f"() => +document.querySelector('#loss-points').textContent > {first}")
    assert page.locator("#loss-chart polyline.series").count() >= 1
    run_id = page.inner_text("#run-id")
    shots("training")

    # 3. reload mid-run: the same run, where it is
    mid = int(page.inner_text("#loss-points"))
    page.reload()
    page.wait_for_function(f"() => document.querySelector('#run-id').textContent === '{run_id}'")
    page.wait_for_function(f"() => +document.querySelector('#loss-points').textContent >= {mid}")
    page.wait_for_function("() => document.querySelector('#run-state').textContent.startsWith('done')", timeout=240_000)
    assert page.inner_text("#loss-points") == "120"
    shots("training-done")

    # 4. load the new expert into the engine
    page.goto(f"{url}/ui/experts")
    page.click("button.load[data-name=fixer]")
    page.wait_for_selector("article[data-name=fixer] .badge.on")
    assert "fixer" in httpx.get(f"{url}/v1/models").text
    shots("experts")

    # 5. chat with auto and see the route badge
    page.goto(f"{url}/ui/playground")
    page.select_option("#model", "auto")
    page.fill("#prompt", "How do I fix thing 3?")
    page.fill("#max-tokens", "8")
    page.click("#chat-form button[type=submit]")
    page.wait_for_function("() => document.querySelector('.answer .route')?.textContent.startsWith('→')")
    assert page.inner_text(".answer .route").startswith("→ base") or "→" in page.inner_text(".answer .route")
    shots("playground")

    # 6. side by side: the base and the new expert at once
    page.check("#side-by-side")
    page.uncheck(".compare[value=auto]")
    page.check(".compare[value=fixer]")
    page.click("#chat-form button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('.answer').length === 2 && "
                           "[...document.querySelectorAll('.answer .text')].every(t => t.textContent.length > 0)")
    assert sorted(page.eval_on_selector_all(".answer", "els => els.map(e => e.dataset.model)")) == ["base", "fixer"]
    shots("side-by-side")

    # 7. export to GGUF and download it
    page.goto(f"{url}/ui/experts")
    page.click("button.export[data-name=fixer]")
    page.wait_for_selector("article[data-name=fixer] a.gguf-link")
    with page.expect_download() as dl:
        page.click("article[data-name=fixer] a.gguf-link")
    saved = tmp_path / "download.gguf"
    dl.value.save_as(str(saved))
    assert saved.read_bytes()[:4] == b"GGUF"
    assert saved.read_bytes() == (ui.experts_root / "fixer" / dl.value.suggested_filename).read_bytes()
    shots("exported")
    assert errors == []
    assert len(list((tmp_path / "shots").glob("*.png"))) == 8
