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
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")  # autoscaling within seconds
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1, resources={"dmoe_replica": 4}, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    proxy_port = unused_port()  # Ray's HTTP proxy, for the `ray` ingress; the default gateway takes HTTP itself
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": proxy_port})
    yield {"cluster": cluster, "workers": workers, "proxy_port": proxy_port}
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

    port = unused_port()
    serve.run(build_app(cluster_cfg(tiny_base, cluster_experts, keywords, port=port)), name="dmoe", route_prefix=None)
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "port": port, **ray_cluster}


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


def test_the_ray_proxy_ingress_serves_the_same_replies(deployed, tiny_base, cluster_experts, keywords, reference):
    """``ingress: ray``: Ray Serve's HTTP proxy in front of the same gateway app (a second application)."""
    from ray import serve

    from dmoe.cluster.deploy import build_app

    cfg = cluster_cfg(tiny_base, cluster_experts, keywords, ingress="ray", replicas=1)
    serve.run(build_app(cfg), name="dmoe_proxy", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{deployed['proxy_port']}"
        r = chat(url, "q2", model="alpha")
        assert r.status_code == 200, r.text
        assert text_of(r) == reference("q2", [("alpha", 1.0)])
        assert r.json()["dmoe"]["cluster"]["replica"]
        assert chat(url, "q2", model="nope").status_code == 404
    finally:
        serve.delete("dmoe_proxy")


def test_the_gateway_refuses_a_busy_port_with_a_readable_error(deployed, tiny_base, cluster_experts, keywords):
    """A second gateway on the first one's port fails at once, naming the port (not a hang)."""
    from ray import serve

    from dmoe.cluster.deploy import run_app
    from dmoe.errors import ClusterError

    cfg = cluster_cfg(tiny_base, cluster_experts, keywords, replicas=1, port=deployed["port"])
    with pytest.raises(ClusterError, match=f"Gateway: cannot listen on 127.0.0.1:{deployed['port']} .*choose another --port"):
        run_app(cfg, "dmoe_busy")
    assert "dmoe_busy" not in serve.status().applications  # the failed application was removed
    assert chat(deployed["url"], "q1", model="alpha").status_code == 200  # the first gateway still serves


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


# ------------------------------------------------------------------ top-k fan-out and aggregation
def test_each_aggregation_changes_the_answer_where_it_should(deployed, reference):
    """'shared lead': beta 0.5, alpha 0.25, alpha2 0.25. top-1 answers with beta; alpha and
    alpha2 share their weights, so their replies agree and outvote beta's."""
    url, q = deployed["url"], "shared lead"
    beta, alpha = reference(q, [("beta", 1.0)]), reference(q, [("alpha", 1.0)])
    assert beta != alpha, "precondition: the two experts answer differently"
    top1 = chat(url, q, dmoe={"routing": "top1"})
    assert top1.json()["dmoe"]["route"]["label"] == "beta" and text_of(top1) == beta

    vote = chat(url, q, dmoe={"routing": "topk", "k": 3, "aggregate": "vote"})
    assert vote.status_code == 200, vote.text
    info = vote.json()["dmoe"]["cluster"]
    assert sorted(c["expert"] for c in info["candidates"]) == ["alpha", "alpha2", "beta"]
    assert text_of(vote) == alpha != text_of(top1)
    assert info["chosen"] in ("alpha", "alpha2") and "2 of 3" in info["why"]

    weighted = chat(url, q, dmoe={"routing": "topk", "k": 3, "aggregate": "weighted"})
    cands = weighted.json()["dmoe"]["cluster"]["candidates"]
    import math
    best = max(cands, key=lambda c: (math.log(c["p"]) + c["mean_logprob"], c["p"]))
    assert text_of(weighted) == best["text"] and weighted.json()["dmoe"]["cluster"]["chosen"] == best["expert"]
    for c in cands:  # each candidate is that expert's own greedy reply
        assert c["text"] == reference(q, [(c["expert"], 1.0)])

    ensemble = chat(url, q, dmoe={"routing": "topk", "k": 3, "aggregate": "ensemble"})
    blend = [(e["name"], e["scale"]) for e in ensemble.json()["dmoe"]["experts"]]
    assert sorted(n for n, _ in blend) == ["alpha", "alpha2", "beta"]
    assert text_of(ensemble) == reference(q, [(n, s) for n, s in blend]) != beta


def test_a_streamed_fan_out_sends_the_chosen_reply(deployed, reference):
    url, q = deployed["url"], "shared lead"
    body = {"model": "auto", "messages": [{"role": "user", "content": q}], "max_tokens": 8, "ignore_eos": True,
            "stream": True, "dmoe": {"routing": "topk", "k": 3, "aggregate": "vote"}}
    text, chunks = "", []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                text += "".join((c.get("delta") or {}).get("content") or "" for c in chunks[-1]["choices"])
    assert text == reference(q, [("alpha", 1.0)])
    assert chunks[0]["dmoe"]["cluster"]["aggregate"] == "vote"


# ------------------------------------------------------------------ strategies
def replicas(deployed) -> list[dict]:
    from ray import serve

    return serve.get_deployment_handle("Gateway", app_name="dmoe").cluster.remote().result(timeout_s=60)["replicas"]


def test_load_routing_spreads_over_the_qualifying_experts(deployed, reference):
    """routing=load: 'shared' qualifies alpha, alpha2 and beta (1/3 each); concurrent requests
    go to the expert with the fewest in flight, so more than one of them answers."""
    url = deployed["url"]
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda _: chat(url, "shared", dmoe={"routing": "load"}), range(12)))
    assert all(r.status_code == 200 for r in rs)
    used = {r.json()["dmoe"]["experts"][0]["name"] for r in rs}
    assert len(used) >= 2 and used <= {"alpha", "alpha2", "beta"}
    for r in rs:
        assert text_of(r) == reference("shared", [(r.json()["dmoe"]["experts"][0]["name"], 1.0)])


def test_latency_routing_avoids_a_slowed_replica(deployed):
    from ray import serve

    url = deployed["url"]
    reps = replicas(deployed)
    assert len(reps) == 3
    slow = reps[0]["replica"]
    handle = serve.get_deployment_handle("ExpertReplica", app_name="dmoe")
    others = [r["replica"] for r in reps if r["replica"] != slow]
    assert handle.inject.remote(0.05, exclude=others).result(timeout_s=30)["replica"] == slow
    try:
        def one(i):
            return chat(url, f"q{i}", model="alpha", dmoe={"routing": "latency"}, max_tokens=6)

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(one, range(12)))  # every replica gets measured
            rs = list(pool.map(one, range(45)))
        assert all(r.status_code == 200 for r in rs)
        share = sum(r.json()["dmoe"]["cluster"]["replica"] == slow for r in rs) / len(rs)
        assert share < 0.2, f"the slowed replica served {share:.0%} of latency-routed requests (uniform: 33%)"
    finally:
        handle.inject.remote(0.0, exclude=others).result(timeout_s=30)


# ------------------------------------------------------------------ runtime changes
def test_an_expert_registered_mid_load_serves_and_nothing_in_flight_fails(deployed, cluster_experts, reference):
    url = deployed["url"]
    new = cluster_experts / "gamma2"
    shutil.copytree(cluster_experts / "gamma", new)
    card = yaml.safe_load((new / "expert.yaml").read_text())
    card["name"] = "gamma2"
    (new / "expert.yaml").write_text(yaml.safe_dump(card))
    with ThreadPoolExecutor(4) as pool:
        load = [pool.submit(chat, url, f"q{i}", ["alpha", "beta", "gamma"][i % 3]) for i in range(24)]
        r = httpx.post(f"{url}/v1/experts", json={"path": str(new)}, timeout=60)
        assert r.status_code == 200, r.text
        first = chat(url, "q9", model="gamma2")
        results = [f.result() for f in load]
    assert first.status_code == 200 and text_of(first) == reference("q9", [("gamma", 1.0)])
    assert all(x.status_code == 200 for x in results)
    assert "gamma2" in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    assert httpx.delete(f"{url}/v1/experts/gamma2", timeout=30).status_code == 200
    assert chat(url, "q9", model="gamma2").status_code == 404


# ------------------------------------------------------------------ bad input reaching a replica
@pytest.fixture
def foreign(cluster_experts):
    """beta's weights carded for another base, inside the roots (refused for its base, not its
    place); removed after the test, so no later deployment of the folder meets it."""
    path = cluster_experts / "foreign"
    shutil.copytree(cluster_experts / "beta", path)
    (path / "dmoe_manifest.json").unlink(missing_ok=True)
    card = yaml.safe_load((path / "expert.yaml").read_text())
    card["name"], card["base"]["sha256"] = "foreign", "0" * 64
    (path / "expert.yaml").write_text(yaml.safe_dump(card))
    yield path
    shutil.rmtree(path)


def test_a_replica_refuses_an_adapter_for_another_base_and_a_lost_object(deployed, cluster_experts, foreign):
    import ray
    from ray import serve

    from dmoe.cluster.store import pack_expert
    from dmoe.experts import load_expert

    # the gateway checks first: a 400 that names both bases
    r = httpx.post(f"{deployed['url']}/v1/experts", json={"path": str(foreign)}, timeout=60)
    assert r.status_code == 400 and "trained on base" in r.json()["error"]["message"]
    # and a replica checks again (a gateway and replicas on different bases)
    blob = pack_expert(load_expert(foreign))
    handle = serve.get_deployment_handle("ExpertReplica", app_name="dmoe").options(multiplexed_model_id="foreign")
    job = {"kind": "chat", "body": {"model": "foreign", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
           "adapters": [["foreign", 1.0]]}
    out = handle.generate.remote(job, {"foreign": (ray.put(blob), blob.fingerprint)}, {"foreign": blob.fingerprint}).result(
        timeout_s=60)
    assert out["error"]["type"] == "ExpertError" and "trained on base" in out["error"]["message"]
    # an object the store lost (its owner died): a typed error that says what to do, and the replica goes on serving
    @ray.remote(num_cpus=0)
    class Owner:
        def put(self, b):
            return [ray.put(b)]  # in a list: the caller gets the reference, not the value

    owner = Owner.remote()
    lost_blob = pack_expert(load_expert(cluster_experts / "gamma"))
    [lost] = ray.get(owner.put.remote(lost_blob))
    ray.kill(owner)
    job["adapters"] = [["gamma", 1.0]]
    out = serve.get_deployment_handle("ExpertReplica", app_name="dmoe").options(multiplexed_model_id="lostgamma").generate.remote(
        {**job, "adapters": [["lostgamma", 1.0]]}, {"lostgamma": (lost, lost_blob.fingerprint)},
        {"lostgamma": lost_blob.fingerprint}).result(timeout_s=60)
    assert out["error"]["type"] in ("ExpertFetchError",), out
    assert chat(deployed["url"], "q1", model="gamma").status_code == 200


# ------------------------------------------------------------------ failover (last: it damages the cluster)
def wait_running(app: str, limit_s: float = 180) -> dict:
    """Poll Serve until application ``app`` runs (bounded); its status."""
    import time

    from ray import serve

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        st = serve.status().applications.get(app)
        if st is not None and str(st.status.value if hasattr(st.status, "value") else st.status) == "RUNNING":
            return st
        assert st is None or "FAILED" not in str(st.status), st
        time.sleep(0.5)
    raise AssertionError(f"{app} did not run within {limit_s} s: {serve.status().applications.get(app)}")


def running_replicas(app: str) -> int:
    from ray import serve

    d = serve.status().applications[app].deployments["ExpertReplica"]
    return sum(v for k, v in d.replica_states.items() if "RUNNING" in str(k))


def test_a_written_serve_config_deploys_and_autoscales(deployed, tiny_base, cluster_experts, keywords, tmp_path, reference):
    """``dmoe cluster config``'s file, deployed the way ``serve deploy`` does (Serve's controller
    builds it from the import path and args), scales its replicas up under load."""
    import threading
    import time

    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from dmoe.cluster.deploy import serve_config

    port = unused_port()
    cfg = cluster_cfg(tiny_base, cluster_experts, keywords, port=port, replica_cpus=0.25, min_replicas=1, max_replicas=2,
                      target_ongoing_requests=1, upscale_delay_s=0.5, step_delay_s=0.02)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config(cfg, name="dmoe_cfg"), sort_keys=False))
    written = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    actor = written.applications[0].deployments[0].ray_actor_options
    assert actor.num_cpus == 0.25 and actor.resources == {"dmoe_replica": 1}
    _get_global_client().deploy_apps(written)
    try:
        wait_running("dmoe_cfg")
        url = f"http://127.0.0.1:{port}"
        r = chat(url, "q1", model="alpha")
        assert r.status_code == 200 and text_of(r) == reference("q1", [("alpha", 1.0)])
        assert running_replicas("dmoe_cfg") == 1
        stop, failed = threading.Event(), []

        def client(k: int) -> None:
            for i in range(200):  # bounded; ends when the scale-up was seen
                if stop.is_set():
                    return
                r = chat(url, f"load {k} {i}", model=("alpha", "beta", "gamma")[k % 3], max_tokens=24)
                if r.status_code != 200:
                    failed.append(r.status_code)

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while running_replicas("dmoe_cfg") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        scaled = running_replicas("dmoe_cfg")
        stop.set()
        for t in threads:
            t.join(120)
        assert scaled == 2, "6 requests in flight against a target of 1 per replica did not add the second replica"
        assert failed == []
    finally:
        serve.delete("dmoe_cfg")


def test_llamacpp_replicas_serve_what_a_local_llamacpp_server_serves(deployed, tiny_gguf_base, tiny_gguf_experts, keywords,
                                                                     make_state):
    """``engine: llamacpp`` replicas: GGUF base, adapters from the object store, the same greedy replies."""
    from ray import serve

    from dmoe.cluster.config import ClusterConfig
    from dmoe.cluster.deploy import run_app
    from dmoe.serve.http import serve_in_thread

    port = unused_port()
    cfg = ClusterConfig.make(base=str(tiny_gguf_base.path), experts_dir=str(tiny_gguf_experts), keywords=str(keywords),
                             engine="llamacpp", replicas=1, replica_cpus=0.25, max_batch=4, max_seq=128,
                             replica_resources={"dmoe_replica": 1}, routing="top1", timeout_s=30.0, gateway_cpus=0.1, port=port)
    run_app(cfg, "dmoe_gguf")
    try:
        url = f"http://127.0.0.1:{port}"
        with serve_in_thread(make_state(tiny_gguf_experts, engine="llamacpp")) as local:
            for name in ("alpha", "beta", "base"):
                got, want = chat(url, "q4", model=name), chat(local, "q4", model=name)
                assert got.status_code == 200 and want.status_code == 200, (got.text, want.text)
                assert text_of(got) == text_of(want)
                assert got.json()["dmoe"]["cluster"]["replica"]
    finally:
        serve.delete("dmoe_gguf")


def test_failover_under_load_replica_killed_then_node_removed(deployed, reference):
    """200 requests over 3 experts, 8 at a time; after 50 replies a replica is SIGKILLed, after
    120 a whole worker node is removed. No client request fails, and every greedy reply equals
    its single-request reference."""
    from concurrent.futures import as_completed

    url = deployed["url"]
    experts = ["alpha", "beta", "gamma"]
    jobs = [(f"q{i % 10}", experts[i % 3]) for i in range(200)]
    victim = replicas(deployed)[0]
    killed = removed = False
    failed, wrong, retried = [], [], 0
    with ThreadPoolExecutor(8) as pool:
        futures = {pool.submit(chat, url, q, name, 8, 180): (q, name) for q, name in jobs}
        for done, fut in enumerate(as_completed(futures), 1):
            q, name = futures[fut]
            r = fut.result()
            if r.status_code != 200:
                failed.append((name, r.status_code, r.text[:200]))
            else:
                retried += r.json()["dmoe"]["cluster"]["retries"]
                if text_of(r) != reference(q, [(name, 1.0)]):
                    wrong.append((q, name))
            if done == 50 and not killed:
                os.kill(victim["pid"], signal.SIGKILL)
                killed = True
            if done == 120 and not removed:
                deployed["cluster"].remove_node(deployed["workers"][1])
                removed = True
    assert killed and removed
    print(f"retried calls: {retried}")
    assert failed == [], f"{len(failed)} requests failed: {failed[:3]}"
    assert wrong == []
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert "dmoe_cluster_replica_calls_total" in metrics
    if retried:
        assert "dmoe_cluster_retries_total{" in metrics
