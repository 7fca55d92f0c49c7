"""``dmoe cluster up | status | down`` as a user runs them: a Ray head started by ``up`` on
127.0.0.1, a request through the printed gateway URL, the status table, and ``down``
stopping what ``up`` started. Runs after test_cluster.py has shut its cluster down, in the
same loopback-only network namespace (skipped elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import unused_port
from test_cluster import interfaces, loopback_only

pytestmark = pytest.mark.cluster
DMOE = [sys.executable, "-m", "dmoe.cli"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run([*DMOE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cluster_up_status_down(tiny_base, tiny_experts, dmoe_home):
    if not loopback_only():
        pytest.skip(f"Ray tests need a loopback-only network namespace (make test uses unshare -n); this one has {interfaces()}")
    port, ray_port = unused_port(), unused_port()
    up = run("cluster", "up", "--experts", str(tiny_experts), "--base", str(tiny_base), "--replicas", "2",
             "--port", str(port), "--ray-port", str(ray_port))
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        url = up.stdout.strip().splitlines()[-1]
        assert url == f"http://127.0.0.1:{port}"
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "beta", "messages": [{"role": "user", "content": "q1"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["dmoe"]["cluster"]["replica"]
        st = run("cluster", "status", "--json")
        assert st.returncode == 0, st.stderr[-2000:]
        view = json.loads(st.stdout)
        assert view["status"] == "RUNNING" and len(view["replicas"]) == 2
        assert view["experts"] == ["alpha", "beta", "gamma"]
        assert any("beta" in rep["experts"] for rep in view["replicas"])
    finally:
        down = run("cluster", "down")
    assert down.returncode == 0, down.stderr[-2000:]
    assert "stopped the Ray head" in down.stdout
    after = run("cluster", "status")
    assert after.returncode == 2 and "dmoe cluster up" in after.stderr
    assert not (Path(dmoe_home) / "cluster.json").exists()
