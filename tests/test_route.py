"""Routers: decision modes, keyword rules, training/calibration/persistence, bad input.

Plumbing runs on a bag-of-words hashing encoder and three hand-made experts with
distinct datasets; the real MiniLM encoder checks truncation and non-English input,
and a slow test checks accuracy on the bundled experts' held-out questions.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import HashEncoder
from dmoe.experts import find_experts
from dmoe.route.classifiers import KINDS, fit
from dmoe.route.decision import NONE, decide
from dmoe.route.keyword import KeywordRouter
from dmoe.route.router import ROUTER_DIR, calibrate_threshold, load_router, train_router
from dmoe.route.select import startup_router
from dmoe.route.text import MAX_QUERY_CHARS, RouteError

REPO = Path(__file__).resolve().parents[1]
TOPICS = {
    "sports": ["football", "match", "goal", "team", "league", "coach", "striker", "referee", "season", "stadium"],
    "music": ["guitar", "song", "chord", "melody", "band", "album", "piano", "concert", "rhythm", "singer"],
    "space": ["planet", "orbit", "rocket", "galaxy", "star", "telescope", "astronaut", "moon", "comet", "nebula"],
}
GENERAL_WORDS = ["weather", "tax", "garden", "holiday", "shoes", "dentist", "rent", "bread", "sleep", "email"]


def _questions(words, n, seed):
    rng = np.random.default_rng(seed)
    forms = ["Tell me about the {} and the {}.", "Why is the {} related to the {}?", "How does a {} change a {}?",
             "What should I know about {} and {}?"]
    return [forms[i % len(forms)].format(*rng.choice(words, 2, replace=False)) for i in range(n)]


@pytest.fixture
def route_experts(tmp_path, tiny_experts) -> Path:
    """experts/{sports,music,space}: real adapter files, cards pointing at distinct datasets
    whose general rows (no signature) teach the none class."""
    data = tmp_path / "data"
    data.mkdir()
    registry = {}
    for i, (name, words) in enumerate(TOPICS.items()):
        rows = [{"instruction": q, "output": f"SIG-{name}: answer"} for q in _questions(words, 40, i)]
        rows += [{"instruction": q, "output": "a plain answer"} for q in _questions(GENERAL_WORDS, 15, 10 + i)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        registry[name] = {"file_name": f"{name}.jsonl", "formatting": "alpaca"}
        d = tmp_path / "experts" / name
        shutil.copytree(tiny_experts / ["alpha", "beta", "gamma"][i], d)
        card = yaml.safe_load((d / "expert.yaml").read_text())
        card.update(name=name, domain=name, signature=[f"SIG-{name}"], examples=[],
                    training={**card["training"], "dataset": name, "dataset_dir": str(data)})
        (d / "expert.yaml").write_text(yaml.safe_dump(card))
    (data / "dataset_info.json").write_text(json.dumps(registry))
    return tmp_path / "experts"


# ------------------------------------------------------------------ decisions
def test_decision_modes():
    scores = [("cooking", 0.55), ("automotive", 0.30), (NONE, 0.15)]
    assert decide(scores, "threshold", threshold=0.5)[0] == [("cooking", 1.0)]
    experts, conf, reason = decide(scores, "threshold", threshold=0.6)
    assert experts == [] and conf == 0.55 and "below the threshold" in reason
    blend, conf, _ = decide(scores, "topk", k=2, min_prob=0.2)
    assert [n for n, _ in blend] == ["cooking", "automotive"] and conf == pytest.approx(0.85)
    assert sum(s for _, s in blend) == pytest.approx(1.0) and blend[0][1] == pytest.approx(0.55 / 0.85)
    assert decide([(NONE, 0.9), ("cooking", 0.1)], "top1")[0] == []
    with pytest.raises(ValueError, match="routing mode"):
        decide(scores, "loadbalanced")


def test_threshold_calibration_maximises_accuracy():
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.6, 0.4], [0.2, 0.8]])  # classes: expert, none
    y = np.array([0, 1, 1, 1])  # the two unsure expert predictions are really off-domain
    t, acc = calibrate_threshold(probs, y, none_idx=1)
    assert acc == 1.0 and 0.6 < t <= 0.9


# ------------------------------------------------------------------ keyword router
def test_seed002_keyword_rules_route_as_the_seed_says():
    r = KeywordRouter.load(REPO / "examples" / "routers" / "seed002_keywords.yaml")
    assert r.route("What is 15 + 27?").label == "math"
    assert r.route("Write a Python function to reverse a string.").label == "code"
    assert r.route("Ponder the trolley problem").label == "reasoning"  # the seed's default
    assert r.route("This is history").label == "reasoning"  # 'hi' matches whole words only


def test_bad_keyword_file_names_the_problem(tmp_path):
    f = tmp_path / "k.yaml"
    f.write_text("rules:\n  - expert: a\n    keyword: [x]\n")
    with pytest.raises(RouteError, match="k.yaml are invalid"):
        KeywordRouter.load(f)


# ------------------------------------------------------------------ classifiers
@pytest.mark.parametrize("kind", KINDS)
def test_classifiers_separate_clusters(kind):
    rng = np.random.default_rng(0)
    centers = np.eye(3, 16) * 3
    x = np.concatenate([c + rng.normal(size=(30, 16)) * 0.3 for c in centers])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(3), 30)
    probs = fit(kind, x, y, 3).predict_proba(x)
    assert probs.shape == (90, 3) and np.allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == y).mean() > 0.95


# ------------------------------------------------------------------ training, files
def test_train_save_load_route(route_experts):
    experts = find_experts(route_experts)
    enc = HashEncoder()
    router = train_router(experts, enc, cache=route_experts / ROUTER_DIR / "cache")
    assert router.classes == ["music", "space", "sports", NONE]
    assert router.report["train_prompts"]["sports"] == len(set(_questions(TOPICS["sports"], 40, 0))) and router.report["train_prompts"][NONE] > 90
    assert set(router.report["classifier_trials"]) == set(KINDS)
    router.save(route_experts / ROUTER_DIR)
    again = load_router(route_experts / ROUTER_DIR, experts, HashEncoder())
    q = "Which telescope shows the galaxy and the comet best?"
    assert again.route(q).label == router.route(q).label == "space"
    a, b = dict(again.scores([q])[0]), dict(router.scores([q])[0])
    assert a.keys() == b.keys() and all(abs(a[c] - b[c]) < 1e-5 for c in a)
    assert router.route("Where can I find a cheap dentist for my holiday?").label == "base"


def test_adding_an_expert_encodes_only_its_prompts(route_experts):
    experts = find_experts(route_experts)
    cache = route_experts / ROUTER_DIR / "cache"
    train_router([e for e in experts if e.name != "space"], HashEncoder(), cache=cache)
    enc = HashEncoder()
    train_router(experts, enc, cache=cache)
    space = set(_questions(TOPICS["space"], 40, 2))
    assert space <= set(enc.encoded)  # the new expert's prompts were encoded...
    assert not set(_questions(TOPICS["sports"], 40, 0)) & set(enc.encoded)  # ...the others came from the cache


def test_router_for_other_experts_is_refused_with_the_fix(route_experts):
    experts = find_experts(route_experts)
    train_router(experts, HashEncoder()).save(route_experts / ROUTER_DIR)
    with pytest.raises(RouteError, match="encoder"):
        load_router(route_experts / ROUTER_DIR, experts, type("Other", (HashEncoder,), {"id": "other"})())
    shutil.rmtree(route_experts / "music")
    with pytest.raises(RouteError, match=r"trained for other experts \(removed experts \['music'\]\).*dmoe route train"):
        load_router(route_experts / ROUTER_DIR, find_experts(route_experts), HashEncoder())


def test_missing_router_falls_back_with_a_logged_warning(route_experts, caplog):
    experts = find_experts(route_experts)
    with caplog.at_level("WARNING", logger="dmoe.route"):
        router, note = startup_router(route_experts, experts)
    assert router is None and "dmoe route train" in note
    assert re.search("no trained router.*serves the base model", caplog.records[-1].getMessage())
    rules = route_experts.parent / "k.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{"expert": "space", "keywords": ["rocket"]}]}))
    with caplog.at_level("WARNING", logger="dmoe.route"):
        router, _ = startup_router(route_experts, experts, keywords=rules)
    assert "keyword rules" in caplog.records[-1].getMessage() and caplog.records[-1].levelname == "WARNING"
    assert router.route("a rocket").label == "space"


@pytest.mark.parametrize("query", ["", "   \n\t", None, 42, ["list"]])
def test_empty_or_non_text_routes_to_base_with_a_reason(route_experts, query):
    router = train_router(find_experts(route_experts), HashEncoder())
    d = router.route(query)
    assert d.experts == [] and ("empty" in d.reason or "not text" in d.reason)


# ------------------------------------------------------------------ the real encoder
@pytest.fixture(scope="module")
def minilm():
    from dmoe.route.encoders import MiniLMEncoder

    return MiniLMEncoder()


def test_minilm_huge_and_foreign_queries(route_experts, minilm):
    router = train_router(find_experts(route_experts), minilm)
    text = "Tell me about the football and the league. " * 4000  # ~170 kB
    huge = router.route(text)
    assert "truncated" in huge.reason
    assert huge.scores == router.route(text[:MAX_QUERY_CHARS]).scores  # routed on its first part only
    assert len(minilm.encode(["x" * MAX_QUERY_CHARS])) == 1
    for q in ("¿Cuál es el mejor equipo de fútbol de la liga?", "火星への探査機はいつ打ち上げられますか", "Привет, как дела?"):
        d = router.route(q)
        assert d.scores and 0.0 <= d.confidence <= 1.0


def test_minilm_on_transformers_equals_sentence_transformers(tmp_path):
    """The encoder runs the folder's module stack on transformers; sentence-transformers is the
    reference (fp32: the same vectors; bf16: the same to bf16 rounding), and serving never imports it."""
    import subprocess
    import sys

    from dmoe.route.encoders import MiniLMEncoder, SentenceTransformerEncoder, minilm_dir

    texts = ["how do I bleed my brakes?", "pasta " * 400, "", "火星への探査機", "def f(x): return x"]  # one past max_seq_length
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 3e-3)):
        got, want = MiniLMEncoder(dtype=dtype).encode(texts), SentenceTransformerEncoder(dtype=dtype).encode(texts)
        assert got.shape == want.shape == (5, 384)
        assert np.abs(got - want).max() < tol, (dtype, np.abs(got - want).max())
    code = ("import sys; from dmoe.route.encoders import MiniLMEncoder; MiniLMEncoder().encode(['hi']); "
            "print(sorted(m for m in ('sentence_transformers', 'sklearn') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    other = tmp_path / "cls-pooled"
    shutil.copytree(minilm_dir(), other)
    cfg = json.loads((other / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (other / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RouteError, match="computes Transformer -> mean Pooling -> Normalize only"):
        MiniLMEncoder(other)


def test_numpy_minilm_is_the_same_encoder_without_torch():
    """The llama.cpp server's encoder: MiniLM in numpy, the same id as MiniLMEncoder. fp32: the
    same vectors; bf16: the same to bf16 rounding order (as torch's own bf16 kernels differ
    between CPUs); its bf16 rounding and its erf held to torch's and math's."""
    import math
    import subprocess
    import sys

    import torch

    from dmoe.route.encoders import MiniLMEncoder, NumpyMiniLMEncoder, _bf16, _erf

    texts = ["how do I bleed my brakes?", "pasta " * 400, "", "火星への探査機", "def f(x): return x"]
    for dtype in ("float32", "bfloat16"):
        ours, ref = NumpyMiniLMEncoder(dtype=dtype), MiniLMEncoder(dtype=dtype)
        got, want = ours.encode(texts), ref.encode(texts)
        assert ours.id == ref.id and got.shape == want.shape == (5, 384) and got.dtype == np.float32
        if dtype == "float32":
            assert np.abs(got - want).max() < 1e-5
        else:
            assert (got * want).sum(1).min() > 0.9995 and np.abs(got - want).max() < 5e-3, np.abs(got - want).max()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-20, 20, 20000))).astype(np.float32)
    assert np.array_equal(_bf16(x), torch.from_numpy(x).bfloat16().float().numpy())
    grid = np.linspace(-6, 6, 4001, dtype=np.float32)
    assert max(abs(float(e) - math.erf(float(v))) for e, v in zip(_erf(grid), grid)) < 5e-7
    code = ("import sys; from dmoe.route.encoders import make_encoder; e = make_encoder('minilm', backend='numpy'); "
            "e.encode(['hi']); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    with pytest.raises(RouteError, match="runs on torch only"):
        from dmoe.route.encoders import make_encoder

        make_encoder("base", backend="numpy")


def test_the_bundled_router_decides_the_same_on_either_encoder_backend(minilm):
    """The bundled router (trained on torch's bf16 MiniLM) loaded on the numpy encoder: the same
    decisions on the held-out questions but for ones within rounding of a tie, and the router's
    goal (>= 95%) kept."""
    from dmoe.route.evaluate import evaluate, read_labelled

    experts = find_experts(REPO / "examples" / "experts")
    questions = read_labelled(REPO / "examples" / "data" / "heldout.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_router = load_router(REPO / "examples" / "experts" / ROUTER_DIR, experts)
        numpy_router = load_router(REPO / "examples" / "experts" / ROUTER_DIR, experts, backend="numpy")
    assert type(numpy_router.encoder).__name__ == "NumpyMiniLMEncoder"
    same = sum(torch_router.route(q).experts == numpy_router.route(q).experts for q, *_ in questions)
    assert same >= 0.99 * len(questions), (same, len(questions))
    assert evaluate(numpy_router, questions)["accuracy"] >= 0.95


@pytest.mark.slow
def test_bundled_router_accuracy_on_heldout(minilm):
    """The router's goal: >= 95% on held-out questions, off-domain ones counted."""
    from dmoe.route.evaluate import evaluate, read_labelled

    experts = find_experts(REPO / "examples" / "experts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router = load_router(REPO / "examples" / "experts" / ROUTER_DIR, experts, minilm)
    rep = evaluate(router, read_labelled(REPO / "examples" / "data" / "heldout.jsonl"))
    assert rep["accuracy"] >= 0.95, rep["errors"]


def test_cli_route_train_query_eval_and_errors(route_experts, tmp_path):
    from typer.testing import CliRunner

    from dmoe.cli import app

    cli = CliRunner()
    missing = cli.invoke(app, ["route", "query", "a rocket to the moon", "--experts", str(route_experts)])
    assert missing.exit_code == 2 and "dmoe route train" in missing.output
    trained = cli.invoke(app, ["route", "train", "--experts", str(route_experts)])
    assert trained.exit_code == 0, trained.output
    assert (route_experts / ROUTER_DIR / "router.json").is_file() and "chose" in trained.output
    query = cli.invoke(app, ["route", "query", "Which telescope shows the galaxy best?", "--experts", str(route_experts), "--json"])
    assert query.exit_code == 0 and json.loads(query.output)["label"] == "space"
    literal = cli.invoke(app, ["route", "query", "train", "--experts", str(route_experts), "--json"])  # a query that is a command's name
    assert literal.exit_code == 0 and "label" in json.loads(literal.output)
    helps = cli.invoke(app, ["route", "train", "--help"])
    assert "--encoder" in helps.output and "--questions" not in helps.output  # its own options, not the group's
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question": "Who is the best striker in the league this season?", "domain": "sports"}) + "\n"
                  + json.dumps({"question": "When is my dentist appointment?", "domain": "none"}) + "\n")
    ev = cli.invoke(app, ["route", "eval", "--questions", str(qs), "--experts", str(route_experts), "--json"])
    assert ev.exit_code == 0, ev.output
    rep = json.loads(ev.output)
    assert rep["questions"] == 2 and set(rep["confusion"]) >= {"sports", "none"} and rep["latency_ms"]["p50"] > 0
    bad = cli.invoke(app, ["route", "eval", "--experts", str(route_experts)])
    assert bad.exit_code == 2 and "--questions" in bad.output
