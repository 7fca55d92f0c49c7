"""The screenshots of docs/webui/, taken from a live ``dmoe webui`` on the embedded base.

    .venv/bin/python docs/webui/screenshots.py            # rewrites docs/webui/*.png

Runs on a copy of the bundled experts and data in a temporary folder (nothing in the checkout
changes but the PNGs), with Debian's Chromium driven by Playwright.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _servers import free_port, stop, wait_ready  # noqa: E402, I001
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dmoe-shots-"))
    shutil.copytree(REPO / "examples" / "experts", tmp / "experts")
    shutil.copytree(REPO / "examples" / "data", tmp / "data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dmoe.cli", "webui", "--experts", str(tmp / "experts"), "--data-dir",
                             str(tmp / "data"), "--port", str(port)], env={**os.environ, "DMOE_HOME": str(tmp / "home")})
    try:
        wait_ready(url, proc)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=os.environ.get("DMOE_CHROMIUM", "/usr/bin/chromium"), args=FLAGS)
            page = b.new_page(viewport={"width": 1100, "height": 800})
            page.set_default_timeout(300_000)

            def shot(name: str, full: bool = False) -> None:
                page.screenshot(path=str(HERE / f"{name}.png"), full_page=full)

            page.goto(f"{url}/ui/playground")
            page.fill("#prompt", "How do I make crispy roast potatoes?")
            page.fill("#max-tokens", "48")
            page.check("#side-by-side")
            page.check(".compare[value=cooking]")
            page.click("#chat-form button[type=submit]")
            page.wait_for_function("() => document.querySelectorAll('.answer').length === 3 && "
                                   "document.querySelector('.answer[data-model=auto] .route').textContent.startsWith('→')")
            page.wait_for_load_state("networkidle")
            shot("playground")

            page.goto(f"{url}/ui/datasets")
            page.click("button.preview[data-name=cooking]")
            page.wait_for_selector("#preview .tokens")
            shot("datasets")

            page.goto(f"{url}/ui/train")
            for key, value in {"expert_name": "cooking_ui", "dataset": "cooking", "max_steps": "200",
                               "logging_steps": "1", "save_steps": "1000"}.items():
                page.fill(f"#train-form [name={key}]", value)
            page.click("#train-form button[type=submit]")
            page.wait_for_function("() => +document.querySelector('#loss-points').textContent >= 12")
            page.evaluate("document.querySelector('#run').scrollIntoView()")
            shot("train")
            page.click("#run-stop")

            page.goto(f"{url}/ui/experts")
            page.wait_for_timeout(1000)  # the loss curves load after the page
            shot("experts")
            b.close()
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
