"""The MCP server through the SDK's in-process Client: every tool, progress notifications
during training, and tool errors for bad arguments (the server keeps serving)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402

from conftest import REPO, write_jsonl  # noqa: E402
from dmoe.mcp.server import build_mcp  # noqa: E402


def _data(result) -> object:
    """A tool result's structured value (or its text parsed as JSON)."""
    if result.structured_content is not None:
        sc = result.structured_content
        return sc.get("result", sc) if isinstance(sc, dict) and set(sc) == {"result"} else sc
    return json.loads(result.content[0].text)


def _error(result) -> str:
    assert result.is_error, result
    return result.content[0].text


@pytest.fixture
def server(tiny_base, tiny_experts, tmp_path):
    rules = tmp_path / "kw.yaml"
    rules.write_text("rules:\n  - expert: alpha\n    keywords: [apples]\ndefault: none\n")
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"question {i} about apples", "output": f"answer {i}", "domain": "fruit" if i % 2 else "other"} for i in range(16)])
    return build_mcp(experts_dir=tiny_experts, base=str(tiny_base), dataset_dir=tmp_path, keywords=rules), data


def test_moe_tools_end_to_end(server, tiny_base, tmp_path):
    srv, data = server

    async def main():
        progress = []

        async def on_progress(p, total, message):
            progress.append((p, message))

        async with Client(srv) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"moe_load_model", "moe_train", "moe_train_status", "moe_generate", "moe_analyze", "list_experts",
                    "route_query", "chat", "load_expert", "set_expert_scale"} <= names
            loaded = _data(await c.call_tool("moe_load_model", {"model_name": str(tiny_base), "num_experts": 4,
                                                                 "expert_capacity": None, "moe_layer_frequency": 1}))
            mid = loaded["model_id"]
            assert loaded["parameters"]["active_per_token"] < loaded["parameters"]["total"]
            out = tmp_path / "moe-out"
            done = _data(await c.call_tool("moe_train", {"model_id": mid, "dataset": str(data), "output_dir": str(out),
                                                         "learning_rate": 1e-3, "batch_size": 4, "num_epochs": 1.0},
                                           progress_callback=on_progress))
            assert done["state"] == "done" and done["step"] == 4 and done["loss"] > 0
            assert len(progress) == 4 and "aux" in progress[-1][1]  # one notification per step
            status = _data(await c.call_tool("moe_train_status", {"job_id": done["job_id"]}))
            assert status["state"] == "done" and len(status["loss_history"]) == 4
            assert (out / "moe_config.json").is_file() and (out / "train_log.jsonl").is_file()
            # background run: returns at once, then the status shows it finishing
            bg = _data(await c.call_tool("moe_train", {"model_id": mid, "dataset": "train.jsonl", "output_dir": str(tmp_path / "bg"),
                                                       "learning_rate": 1e-3, "batch_size": 8, "num_epochs": 1.0, "wait": False}))
            assert bg["state"] == "running"
            busy = await c.call_tool("moe_generate", {"model_id": mid, "prompt": "hi", "max_length": 4, "temperature": 0.0})
            if busy.is_error:
                assert "is training" in _error(busy)
            for _ in range(600):
                st = _data(await c.call_tool("moe_train_status", {"job_id": bg["job_id"]}))
                if st["state"] != "running":
                    break
                await asyncio.sleep(0.1)
            assert st["state"] == "done" and st["step"] == 2
            gen = _data(await c.call_tool("moe_generate", {"model_id": mid, "prompt": "hi", "max_length": 5, "temperature": 0.7}))
            assert isinstance(gen["text"], str)
            report = _data(await c.call_tool("moe_analyze", {"model_id": mid, "data": str(data), "output_dir": str(tmp_path / "an")}))
            assert len(report["utilization"]) == 2 and set(report["domains"]) == {"fruit", "other"}
            assert Path(report["heatmap"]).is_file()

    asyncio.run(main())


def test_moe_tool_errors_keep_the_server_alive(server, tiny_base, tmp_path):
    srv, data = server

    async def main():
        async with Client(srv) as c:
            assert "must be at least top_k" in _error(await c.call_tool("moe_load_model", {"model_name": str(tiny_base), "num_experts": 1, "top_k": 2}))
            assert "unknown model_id 'nope'" in _error(await c.call_tool("moe_generate", {"model_id": "nope", "prompt": "x"}))
            mid = _data(await c.call_tool("moe_load_model", {"model_name": str(tiny_base), "num_experts": 2, "moe_layer_frequency": 2}))["model_id"]
            err = _error(await c.call_tool("moe_train", {"model_id": mid, "dataset": str(data), "output_dir": str(tmp_path / "o"), "learning_rate": -1.0}))
            assert "learning_rate" in err and "greater than 0" in err
            err = _error(await c.call_tool("moe_train", {"model_id": mid, "dataset": str(tmp_path / "missing.jsonl"), "output_dir": str(tmp_path / "o")}))
            assert "does not exist" in err
            assert "unknown job_id" in _error(await c.call_tool("moe_train_status", {"job_id": "train-99"}))
            assert "not found" in _error(await c.call_tool("moe_analyze", {"model_id": mid, "data": str(tmp_path / "nope.jsonl")}))
            # still serving
            assert _data(await c.call_tool("moe_generate", {"model_id": mid, "prompt": "hi", "max_length": 2}))["text"] is not None

    asyncio.run(main())


def test_expert_tools(server):
    srv, _ = server

    async def main():
        async with Client(srv) as c:
            experts = _data(await c.call_tool("list_experts", {}))
            assert [e["name"] for e in experts] == ["alpha", "beta", "gamma"]
            route = _data(await c.call_tool("route_query", {"query": "I like apples"}))
            assert route["label"] == "alpha"
            assert _data(await c.call_tool("route_query", {"query": "the weather"}))["label"] == "base"
            auto = _data(await c.call_tool("chat", {"message": "tell me about apples", "max_tokens": 4}))
            assert auto["experts"] == ["alpha"] and auto["route"]["label"] == "alpha"
            forced = _data(await c.call_tool("chat", {"message": "tell me about apples", "expert": "beta", "max_tokens": 4}))
            assert forced["experts"] == ["beta"]
            assert "unknown expert 'zeta'" in _error(await c.call_tool("chat", {"message": "x", "expert": "zeta"}))
            assert _data(await c.call_tool("set_expert_scale", {"name": "alpha", "scale": 0.5}))["scale"] == 0.5
            assert "unknown expert" in _error(await c.call_tool("set_expert_scale", {"name": "zeta", "scale": 1.0}))
            half = _data(await c.call_tool("list_experts", {}))
            assert {e["name"]: e["scale"] for e in half}["alpha"] == 0.5
            assert _data(await c.call_tool("load_expert", {"name_or_path": "gamma"}))["name"] == "gamma"
            assert "outside the expert roots" in _error(await c.call_tool("load_expert", {"name_or_path": "/etc"}))

    asyncio.run(main())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dmoe_mcp_over_stdio_and_http(tiny_base, tiny_experts, tmp_path):
    """The real `dmoe mcp` command: stdio, and streamable HTTP on 127.0.0.1."""
    import subprocess
    import sys
    import time

    from mcp import StdioServerParameters

    dmoe = str(Path(sys.executable).parent / "dmoe")
    common = ["--experts", str(tiny_experts), "--base", str(tiny_base)]

    async def stdio():
        async with Client(StdioServerParameters(command=dmoe, args=["mcp", *common])) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert "moe_load_model" in names and "chat" in names
            assert "unknown model_id" in _error(await c.call_tool("moe_generate", {"model_id": "x", "prompt": "hi"}))

    asyncio.run(stdio())
    port = _free_port()
    proc = subprocess.Popen([dmoe, "mcp", "--transport", "http", "--port", str(port), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def http():
            async with Client(f"http://127.0.0.1:{port}/mcp") as c:
                experts = _data(await c.call_tool("list_experts", {}))
                assert [e["name"] for e in experts] == ["alpha", "beta", "gamma"]

        for _ in range(200):  # wait for the port
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
        asyncio.run(http())
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_run_by_a_person_it_says_what_it_is_and_one_ctrl_c_quits(tmp_path):
    """On a terminal, `dmoe mcp` prints one line on what it speaks and how to connect, and the
    first Ctrl-C ends it (exit 130), rather than waiting for a line on stdin."""
    import os
    import pty
    import select
    import shutil
    import time

    exe = shutil.which("dmoe") or str(REPO / ".venv" / "bin" / "dmoe")
    pid, fd = pty.fork()
    if pid == 0:  # the child: dmoe mcp on a terminal
        os.execv(exe, [exe, "mcp", "--experts", str(tmp_path)])
    out, deadline = b"", time.monotonic() + 120
    while b"Ctrl-C quits" not in out and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            out += os.read(fd, 4096)
    assert b"speaks MCP over stdio" in out, out
    os.write(fd, b"\x03")
    code = None
    deadline = time.monotonic() + 60
    while code is None and time.monotonic() < deadline:
        try:
            if select.select([fd], [], [], 1)[0]:
                os.read(fd, 4096)
        except OSError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
    assert code == 130
