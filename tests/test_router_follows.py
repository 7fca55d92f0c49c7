"""The router follows hot loads and unloads: a refit in the background, swapped in whole;
until then (or after a failure) ``auto`` keeps the old router. A bag-of-words hashing
encoder stands in for MiniLM: only the plumbing is under test here (the real encoder and
experts: ``test_a_hot_loaded_real_expert_gets_routed`` below, slow)."""

from __future__ import annotations

import json
import shutil
import threading
import zlib

import httpx
import numpy as np
import pytest
import yaml

from conftest import REPO

TOPICS = {
    "alpha": ["how do i prune roses", "when to water tomato plants", "best soil for garden beds", "how to compost leaves",
              "why are my roses wilting", "when should i plant garden bulbs", "how deep to plant tomato seeds",
              "mulch for garden beds", "fertilizer for roses", "how to grow herbs in a garden"],
    "beta": ["how do i change a car tire", "why is my engine overheating", "when to replace brake pads", "car battery dead",
             "engine oil change interval", "how to check tire pressure", "brake fluid leak car", "engine makes noise",
             "car wont start cold", "replace engine air filter"],
    "gamma": ["how to sort a list in python", "python dictionary comprehension", "reverse a string in python",
              "python read a file", "python class inheritance", "python list slicing", "python exception handling",
              "python lambda function", "python loop over dictionary", "python string formatting"],
}


class HashEncoder:
    """Hashed bag of words, L2-normalised: deterministic and good enough for distinct vocabularies."""

    id = "test:hash"
    dim = 256

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)
        return out


@pytest.fixture
def experts(tiny_experts, tmp_path):
    """The tiny experts with distinct topics as their card examples (no training data to find)."""
    root, extra = tmp_path / "experts", tmp_path / "more"
    for name, prompts in TOPICS.items():
        dst = (root if name != "gamma" else extra) / name
        shutil.copytree(tiny_experts / name, dst)
        card = yaml.safe_load((dst / "expert.yaml").read_text())
        card["examples"] = prompts
        card["training"].pop("dataset", None)
        card["training"].pop("dataset_dir", None)
        (dst / "expert.yaml").write_text(yaml.safe_dump(card))
    return root, extra


def _route(url: str, text: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "auto", "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": text}]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["dmoe"]["route"]["label"]


def test_a_hot_loaded_expert_gets_routed_and_an_unloaded_one_does_not(make_state, live_server, experts):
    root, extra = experts
    st = make_state(root, refit_router=True, roots=[extra])
    st.route_encoder = HashEncoder()
    assert st.router is None and st.router_status["state"] == "none"
    with live_server(st) as srv:
        assert _route(srv.url, "python list slicing") == "base"  # no router yet
        r = httpx.post(f"{srv.url}/v1/experts", json={"path": str(extra / "gamma"), "wait_router": True}, timeout=120)
        assert r.status_code == 200, r.text
        status = r.json()["router"]
        assert status["state"] == "ready" and status["experts"] == ["alpha", "beta", "gamma"] and status["val_accuracy"] > 0.5
        assert _route(srv.url, "python string formatting in a loop") == "gamma"
        assert _route(srv.url, "fertilizer for my roses") == "alpha"
        listed = httpx.get(f"{srv.url}/v1/experts").json()
        assert [e["name"] for e in listed["experts"]] == ["alpha", "beta", "gamma"] and listed["router"] == status
        gone = httpx.delete(f"{srv.url}/v1/experts/gamma?wait_router=true", timeout=120)
        assert gone.status_code == 200 and gone.json()["router"]["experts"] == ["alpha", "beta"]
        assert _route(srv.url, "python string formatting in a loop") != "gamma"


def test_the_old_router_serves_until_the_refit_is_swapped_in_and_after_a_failure(make_state, live_server, experts, caplog):
    root, extra = experts
    st = make_state(root, refit_router=True, roots=[extra])
    release = threading.Event()
    entered = threading.Event()

    class SlowEncoder(HashEncoder):
        def encode(self, texts):
            entered.set()
            assert release.wait(60)
            return super().encode(texts)

    st.route_encoder = HashEncoder()
    st.refit_router().join(60)  # a router for alpha and beta
    old = st.router
    assert old is not None and st.router_status["experts"] == ["alpha", "beta"]
    st.route_encoder = SlowEncoder()  # the refit's encoder; the old router keeps its own
    with live_server(st) as srv:
        r = httpx.post(f"{srv.url}/v1/experts", json={"path": str(extra / "gamma")}, timeout=60)
        assert r.status_code == 200 and r.json()["router"]["state"] == "refitting"
        assert "keeps the previous router" in r.json()["router"]["note"]
        assert entered.wait(60)
        assert st.router is old and _route(srv.url, "fertilizer for my roses") == "alpha"  # the old one, meanwhile
        release.set()
        for _ in range(600):  # bounded wait for the background thread (joined through the status)
            if st.router_status["state"] != "refitting":
                break
            threading.Event().wait(0.05)
        assert st.router is not old and st.router_status["state"] == "ready"
        # a failing refit keeps the router it had
        current = st.router

        class Broken(HashEncoder):
            id = "test:broken"  # not the cached embeddings' encoder: it must run

            def encode(self, texts):
                raise RuntimeError("encoder exploded")

        st.route_encoder = Broken()
        with caplog.at_level("WARNING", logger="dmoe.runtime"):
            r = httpx.delete(f"{srv.url}/v1/experts/gamma?wait_router=1", timeout=60)
        assert r.json()["router"]["state"] == "failed" and "encoder exploded" in r.json()["router"]["note"]
        assert st.router is current and any("refit failed" in rec.message for rec in caplog.records)


def test_an_expert_with_nothing_to_route_on_is_served_by_name_with_a_warning(make_state, live_server, experts, tmp_path):
    root, extra = experts
    bare = tmp_path / "more" / "bare"
    shutil.copytree(extra / "gamma", bare)
    card = yaml.safe_load((bare / "expert.yaml").read_text())
    card["name"], card["examples"] = "bare", []
    (bare / "expert.yaml").write_text(yaml.safe_dump(card))
    st = make_state(root, refit_router=True, roots=[extra])
    st.route_encoder = HashEncoder()
    with live_server(st) as srv:
        r = httpx.post(f"{srv.url}/v1/experts", json={"path": str(bare), "wait_router": True}, timeout=120)
        status = r.json()["router"]
        assert status["state"] == "ready" and status["experts"] == ["alpha", "beta"]
        assert any("'bare' has no training prompts" in w for w in status["warnings"])
        ok = httpx.post(f"{srv.url}/v1/completions", json={"model": "bare", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


@pytest.mark.slow
def test_a_hot_loaded_real_expert_gets_routed(tmp_path, dmoe_home):
    """The shipped experts, MiniLM: start with automotive and cooking (router trained for them),
    hot-load programming; its held-out questions route to it, and the other two domains'
    routing accuracy on the same held-out file does not drop."""
    from dmoe.experts import find_experts
    from dmoe.route.encoders import make_encoder
    from dmoe.route.router import train_router
    from dmoe.runtime import ServeConfig, build_state
    from dmoe.serve.http import ThreadedServer

    root, later = tmp_path / "experts", tmp_path / "later"
    for name in ("automotive", "cooking"):
        shutil.copytree(REPO / "examples" / "experts" / name, root / name)
    shutil.copytree(REPO / "examples" / "experts" / "programming", later / "programming")
    train_router(find_experts(root), make_encoder("minilm"), cache=root / "router" / "cache").save(root / "router")
    held = [json.loads(x) for x in (REPO / "examples" / "data" / "heldout.jsonl").read_text().splitlines()]
    per = {d: [r["question"] for r in held if r["domain"] == d][:12] for d in ("automotive", "cooking", "programming")}
    st = build_state(ServeConfig.make(experts_dir=root, roots=[later], max_batch=2, max_seq=512))
    with ThreadedServer(st) as srv:
        before = {d: sum(_route(srv.url, q) == d for q in per[d]) for d in ("automotive", "cooking")}
        assert sum(_route(srv.url, q) == "programming" for q in per["programming"]) == 0
        r = httpx.post(f"{srv.url}/v1/experts", json={"path": str(later / "programming"), "wait_router": True}, timeout=600)
        assert r.status_code == 200 and r.json()["router"]["state"] == "ready", r.text
        assert r.json()["router"]["val_accuracy"] >= 0.9
        after = {d: sum(_route(srv.url, q) == d for q in per[d]) for d in per}
    assert after["programming"] >= 10, after
    assert all(after[d] >= before[d] - 1 for d in before), (before, after)  # within one question of before
