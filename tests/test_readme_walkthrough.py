"""The README's "your own expert in five minutes" block, run as it is from a temporary folder:
train, one folder of experts, the router, the benchmark, the GGUF export."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own expert in five minutes", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.slow
def test_the_readme_walkthrough_runs_from_a_temporary_folder(tmp_path, dmoe_home):
    env = {**os.environ, "DMOE": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DMOE_HOME": str(dmoe_home)}
    env.pop("DMOE_EXPERTS", None)
    env.pop("DMOE_EXAMPLES", None)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", _block()], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    garden = tmp_path / "garden"
    assert (garden / "experts" / "garden" / "expert.yaml").is_file()
    assert (garden / "experts" / "garden" / "garden-f16.gguf").is_file()
    router = json.loads((garden / "experts" / "router" / "router.json").read_text())
    assert "garden" in router["classes"] and "cooking" in router["classes"]
    assert re.search(r"^garden \(p=", r.stdout, flags=re.M), r.stdout  # route query picked it
    summary = json.loads((garden / "results" / "walkthrough" / "summary.json").read_text())
    assert summary["status"] == "complete"
    auto = summary["modes"]["auto"]
    assert auto["routing_accuracy"]["hits"] == 3  # both garden questions to garden, the cat to the base
    assert "Traceback" not in r.stderr
