"""dmoe cluster on Ray Serve, on a simulated multi-node cluster (``ray.cluster_utils.Cluster``)
over the tiny model: the gateway's API, routing strategies, top-k aggregation, hot add,
failover under load with a replica SIGKILLed and a node removed, and bad input.

Ray binds 0.0.0.0 whatever it is told, so these tests run only inside a network namespace
that holds nothing but loopback: ``make test`` runs pytest under ``unshare -n`` with ``lo``
up. Elsewhere they skip, with the reason; they never run on the open network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import unused_port

pytestmark = pytest.mark.cluster
PROMPTS = ["q1", "q3 alpha", "tell me about q5", "q7 beta", "hello there", "q2 gamma", "q11", "numbers 3 and 4"]


def interfaces() -> list[str]:
    """This network namespace's interfaces (/sys/class/net shows the mount namespace's, not these)."""
    import socket

    return sorted(name for _, name in socket.if_nameindex())


def loopback_only() -> bool:
    return interfaces() == ["lo"]


@pytest.fixture(scope="module")
def cluster_experts(tiny_experts, tmp_path_factory) -> Path:
    """alpha, beta, gamma, and alpha2 (alpha's weights under another name: its replies equal alpha's)."""
    root = tmp_path_factory.mktemp("cluster-experts")
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(tiny_experts / name, root / name)
    shutil.copytree(tiny_experts / "alpha", root / "alpha2")
    card = yaml.safe_load((root / "alpha2" / "expert.yaml").read_text())
    card["name"] = "alpha2"
    (root / "alpha2" / "expert.yaml").write_text(yaml.safe_dump(card))
    return root


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("kw") / "keywords.yaml"
    p.write_text(yaml.safe_dump({"rules": [
        {"expert": "alpha", "keywords": ["alpha", "first", "shared"]},
        {"expert": "alpha2", "keywords": ["alpha2", "shared"]},
        {"expert": "beta", "keywords": ["beta", "second", "lead", "shared"]},
        {"expert": "gamma", "keywords": ["gamma", "third"]}], "default": "none"}))
    return p


@pytest.fixture(scope="module")
def ray_cluster(dmoe_home):
    """A head node (the gateway) and two worker nodes (the replicas), all on loopback."""
    if not loopback_only():
        pytest.skip("Ray tests need a network namespace with loopback only (make test runs pytest under `unshare -n`); "
                    f"this one has {interfaces()}")
    pytest.importorskip("ray")
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1, resources={"dmoe_replica": 4}, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    port = unused_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"cluster": cluster, "workers": workers, "port": port}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def cluster_cfg(tiny_base, experts_dir, keywords, **kw):
    from dmoe.cluster.config import ClusterConfig

    values = dict(base=str(tiny_base), experts_dir=str(experts_dir), keywords=str(keywords), replicas=3, max_batch=4,
                  max_seq=128, max_rank=8, replica_resources={"dmoe_replica": 1}, routing="top1", timeout_s=20.0,
                  routing_stats_period_s=0.5, gateway_cpus=0.1)
    values.update(kw)
    return ClusterConfig.make(**values)


@pytest.fixture(scope="module")
def deployed(ray_cluster, tiny_base, cluster_experts, keywords):
    from ray import serve

    from dmoe.cluster.deploy import build_app

    serve.run(build_app(cluster_cfg(tiny_base, cluster_experts, keywords)), name="dmoe", route_prefix="/")
    url = f"http://127.0.0.1:{ray_cluster['port']}"
    yield {"url": url, **ray_cluster}


@pytest.fixture(scope="module")
def reference(make_state_module, cluster_experts):
    """Greedy replies of one local server (the single-request reference)."""
    st = make_state_module(cluster_experts)
    from dmoe.engine.protocol import generate
    from dmoe.engine.request import SamplingParams

    cache: dict = {}

    def ref(prompt: str, adapters: list[tuple[str, float]], max_tokens: int = 8) -> str:
        key = (prompt, tuple(adapters), max_tokens)
        if key not in cache:
            ids = st.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            out = generate(st.engine, [list(ids)], [adapters], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
            cache[key] = st.tokenizer.decode(out, skip_special_tokens=True)
        return cache[key]

    return ref


@pytest.fixture(scope="module")
def make_state_module(tiny_base, dmoe_home):
    from dmoe.runtime import ServeConfig, build_state

    built = []

    def make(experts_dir: Path, **kw):
        st = build_state(ServeConfig.make(base=str(tiny_base), experts_dir=experts_dir, max_batch=4, max_seq=128,
                                          max_loras=8, max_rank=8, use_router=False, **kw))
        built.append(st)
        return st

    yield make
    for st in built:
        st.engine.close()


def chat(url: str, content: str, model: str = "auto", max_tokens: int = 8, timeout: float = 120, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def text_of(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


# ------------------------------------------------------------------ the API, one app over replicas
def test_gateway_serves_the_same_api_and_replies_as_one_server(deployed, reference):
    url = deployed["url"]
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["base", "alpha", "alpha2", "beta", "gamma", "auto"]
    for name in ("alpha", "beta", "base"):
        r = chat(url, "q1", model=name)
        assert r.status_code == 200, r.text
        assert text_of(r) == reference("q1", [(name, 1.0)] if name != "base" else [])
        info = r.json()["dmoe"]["cluster"]
        assert info["replica"] and info["node"] and info["retries"] == 0
        assert r.headers["x-dmoe-replica"] == info["replica"]
    r = chat(url, "tell me about gamma", model="auto")
    assert r.json()["dmoe"]["route"]["label"] == "gamma"
    assert text_of(r) == reference("tell me about gamma", [("gamma", 1.0)])
    lora = httpx.get(f"{url}/lora-adapters", timeout=30).json()
    assert [a["id"] for a in lora] == [0, 1, 2, 3]
    r = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "q3", "max_tokens": 4, "ignore_eos": True},
                   timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_streaming_through_the_gateway_equals_the_reply(deployed, reference):
    url = deployed["url"]
    body = {"model": "beta", "messages": [{"role": "user", "content": "q7"}], "max_tokens": 8, "ignore_eos": True,
            "stream": True}
    text, first = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            first = first or obj
            text += "".join((c.get("delta") or {}).get("content") or "" for c in obj["choices"])
    assert text == reference("q7", [("beta", 1.0)])
    assert first["dmoe"]["cluster"]["replica"]


def test_bad_requests_are_refused_clearly(deployed):
    url = deployed["url"]
    r = chat(url, "q1", model="nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = chat(url, "q1", model="auto", dmoe={"routing": "nonsense"})
    assert r.status_code == 400
    r = chat(url, "q1", model="alpha", dmoe={"aggregate": "vote"})
    assert r.status_code == 400 and "topk" in r.json()["error"]["message"]
    assert chat(url, "q1", model="alpha").status_code == 200  # still serving
