"""Token-level MoE upcycling: every MoEConfig field does what it says, exactness at init on
four architectures, capacity and drop rate, router losses, padding, save/load, training
logs, analysis and generation (tiny random models: plumbing and math)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl
from dmoe.cli import app
from dmoe.config import ConfigError, MoEConfig, MoETrainConfig, load_train_config
from dmoe.moe.layer import MoEMLP, NaiveMoEMLP, capacity_for
from dmoe.moe.model import (
    MoEError,
    collect_stats,
    decoder_layers,
    load_moe,
    moe_layer_indices,
    moe_layers,
    parameter_counts,
    router_losses,
    save_moe,
    upcycle,
)

V = 211


def _tiny(kind: str, layers: int = 4):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    if kind == "gemma":
        from transformers import GemmaConfig, GemmaForCausalLM

        return GemmaForCausalLM(GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=layers, n_head=4, bos_token_id=1, eos_token_id=2)).eval()


def _batch(b: int = 3, t: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    return ids, mask


EXACT = dict(num_experts=8, top_k=2, moe_layer_frequency=1, router_jitter_noise=0.1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "gpt2"])
def test_upcycled_logits_equal_dense_at_init(kind):
    model = _tiny(kind)
    ids, mask = _batch()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
    upcycle(model, MoEConfig(**EXACT))
    assert len(moe_layers(model)) == 4
    with torch.no_grad():
        moe = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (moe - dense)[real].abs().max() <= 1e-4


def test_layer_selection_fields():
    assert moe_layer_indices(12, MoEConfig()) == [0, 2, 4, 6, 8, 10]
    assert moe_layer_indices(12, MoEConfig(moe_layer_frequency=3, moe_layer_start=1)) == [1, 4, 7, 10]
    assert moe_layer_indices(12, MoEConfig(moe_layer_frequency=1, moe_layer_start=2, moe_layer_end=4)) == [2, 3, 4]
    with pytest.raises(MoEError, match="past the model's 12 layers"):
        moe_layer_indices(12, MoEConfig(moe_layer_end=12))
    model = upcycle(_tiny("llama", layers=6), MoEConfig(moe_layer_frequency=2, moe_layer_start=1))
    kinds = [type(layer.mlp).__name__ for layer in decoder_layers(model)]
    assert kinds == ["LlamaMLP", "MoEMLP", "LlamaMLP", "MoEMLP", "LlamaMLP", "MoEMLP"]
    with pytest.raises(MoEError, match="already a MoE"):
        upcycle(model, MoEConfig())


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"num_experts \(2\) must be at least top_k \(3\)"):
        MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="expert_capacity or capacity_factor, not both"):
        MoEConfig(expert_capacity=4, capacity_factor=1.0)
    with pytest.raises(ConfigError, match="moe.top_k"):
        load_train_config(None, ["dataset=x", "moe.top_k=0"], MoETrainConfig)
    cfg = load_train_config(None, ["dataset=x", "moe.num_experts=4", "moe.top_k=1"], MoETrainConfig)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.finetuning_type) == (4, 1, "full")


def test_defaults_match_the_issue():
    c = MoEConfig()
    assert (c.num_experts, c.top_k, c.router_jitter_noise, c.router_aux_loss_coef, c.router_z_loss_coef) == (8, 2, 0.1, 0.01, 0.001)
    assert (c.router_ignore_padding_tokens, c.moe_layer_frequency, c.moe_layer_start, c.moe_layer_end) == (True, 2, 0, None)


def _layer(cfg: MoEConfig, hidden: int = 16, naive: bool = False) -> MoEMLP:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 32), torch.nn.GELU(), torch.nn.Linear(32, hidden))
    cls = NaiveMoEMLP if naive else MoEMLP
    return cls(mlp, hidden, cfg.model_copy(update={"expert_init_noise": 0.5}), torch.Generator().manual_seed(0)).eval()


def test_grouped_dispatch_equals_the_masked_loop():
    cfg = MoEConfig(num_experts=8, top_k=2)
    grouped, naive = _layer(cfg), _layer(cfg, naive=True)
    naive.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 10, 16)
    assert torch.allclose(grouped(x), naive(x), atol=1e-5)
    # the experts really differ (noise), so the routing matters
    assert not torch.allclose(grouped.experts[0](x), grouped.experts[1](x))


def test_top_k_gates_normalised_or_not():
    x = torch.randn(1, 5, 16)
    layer = _layer(MoEConfig(num_experts=4, top_k=2))
    logits, gates, ids = layer.route(x.reshape(-1, 16), None)
    assert gates.shape == (5, 2) and torch.allclose(gates.sum(-1), torch.ones(5))
    raw = _layer(MoEConfig(num_experts=4, top_k=2, normalize_top_k=False))
    _, g2, _ = raw.route(x.reshape(-1, 16), None)
    assert (g2.sum(-1) < 1).all()
    assert logits.dtype == torch.float32


def test_capacity_drops_tokens_and_reports_the_rate():
    assert capacity_for(MoEConfig(capacity_factor=1.0, num_experts=4, top_k=2), 10) == 5
    assert capacity_for(MoEConfig(expert_capacity=3), 100) == 3
    assert capacity_for(MoEConfig(), 100) is None
    x = torch.randn(2, 16, 16)
    free = _layer(MoEConfig(num_experts=4, top_k=2))
    capped = _layer(MoEConfig(num_experts=4, top_k=2, expert_capacity=2))
    capped.load_state_dict(free.state_dict())
    y_free, y_cap = free(x), capped(x)
    s = capped.last
    assert s.assignments == 64 and s.dropped == 64 - int(torch.clamp(s.counts, max=2).sum())
    assert s.dropped > 0 and free.last.dropped == 0
    # a token with both assignments dropped passes through: the layer adds exactly nothing for it
    flat = y_cap.reshape(-1, 16)
    assert (flat.abs().sum(-1) == 0).sum() >= 1
    assert not torch.allclose(y_free, y_cap)


def test_priority_first_choices_before_second():
    layer = _layer(MoEConfig(num_experts=2, top_k=2, expert_capacity=3))
    x = torch.randn(1, 3, 16)
    layer(x)  # 3 tokens x 2 choices over 2 experts, capacity 3 each: nothing dropped
    assert layer.last.dropped == 0
    layer.cfg = layer.cfg.model_copy(update={"expert_capacity": 2})
    layer(x)
    assert layer.last.dropped == 2


def test_aux_and_z_loss_formulas():
    layer = _layer(MoEConfig(num_experts=4, top_k=1))
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities: P_i = 1/4
    layer(torch.randn(1, 8, 16))
    s = layer.last
    # all ties go to expert 0: f = (1, 0, 0, 0) -> N * sum f_i P_i = 4 * 1/4 = 1
    assert float(s.aux_loss) == pytest.approx(1.0)
    assert float(s.z_loss) == pytest.approx(math.log(4) ** 2, rel=1e-5)  # logsumexp of 4 zeros = log 4
    # a router that sends everything to expert 2 with certainty: f = P = one-hot -> aux = N = 4
    with torch.no_grad():
        layer.router.weight.zero_()
    layer.router.weight.data[2] = 1.0
    layer(torch.ones(1, 8, 16) * 10)
    assert float(layer.last.aux_loss) == pytest.approx(4.0, rel=1e-4)


def test_losses_reach_the_router_and_get_logged_per_layer():
    model = upcycle(_tiny("llama"), MoEConfig(num_experts=4, top_k=2))
    model.train()
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask)
    aux, z = router_losses(model)
    (out.logits.mean() + aux + z).backward()
    router = moe_layers(model)[0].router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert len(collect_stats(model)) == 2  # frequency 2 over 4 layers


def test_jitter_only_in_training():
    layer = _layer(MoEConfig(num_experts=4, top_k=2, router_jitter_noise=0.5))
    x = torch.randn(1, 6, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    a, b = layer.route(x.reshape(-1, 16), None)[0], layer.route(x.reshape(-1, 16), None)[0]
    assert not torch.allclose(a, b)


def test_padding_tokens_are_ignored_when_configured():
    ids, mask = _batch()
    for ignore, expected in ((True, int(mask.sum())), (False, mask.numel())):
        model = upcycle(_tiny("llama"), MoEConfig(num_experts=4, top_k=2, router_ignore_padding_tokens=ignore))
        model(input_ids=ids, attention_mask=mask)
        assert collect_stats(model)[0].assignments == 2 * expected


def test_parameter_counts():
    model = _tiny("llama")
    dense = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for p in decoder_layers(model)[0].mlp.parameters())
    upcycle(model, MoEConfig(num_experts=8, top_k=2, moe_layer_frequency=2))
    c = parameter_counts(model)
    router = 32 * 8
    assert c["total"] == dense + 2 * (7 * mlp + router)
    assert c["active_per_token"] == dense + 2 * (1 * mlp + router)


def test_save_and_load_give_identical_outputs(tmp_path, real_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(real_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    upcycle(model, MoEConfig(num_experts=4, top_k=2, expert_init_noise=0.1, capacity_factor=1.5))
    save_moe(model, real_tokenizer, tmp_path / "m")
    loaded, tok, cfg = load_moe(tmp_path / "m")
    assert cfg.capacity_factor == 1.5 and cfg.num_experts == 4
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(MoEError, match="not a dmoe MoE directory"):
        load_moe(tmp_path)


def test_train_logs_losses_utilization_and_drop_rate(tiny_base, tmp_path):
    from dmoe.moe.train import train_moe

    write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"answer {i} with words"} for i in range(16)])
    cfg = load_train_config(None, [f"model_name_or_path={tiny_base}", "dataset=d.jsonl", f"dataset_dir={tmp_path}",
                                   f"output_dir={tmp_path / 'out'}", "max_steps=4", "per_device_train_batch_size=4",
                                   "logging_steps=1", "learning_rate=1e-3", "moe.num_experts=4", "moe.moe_layer_frequency=1",
                                   "moe.capacity_factor=0.5", "gradient_checkpointing=true", "bf16=true"], MoETrainConfig)
    res = train_moe(cfg, show_progress=False)
    assert res.steps == 4 and len(res.history) == 4
    row = res.history[-1]
    for key in ("loss", "lm_loss", "router_aux_loss", "router_z_loss", "drop_rate", "utilization"):
        assert key in row
    assert row["drop_rate"] > 0  # capacity factor 0.5 must drop
    assert len(row["utilization"]) == 2 and abs(sum(row["utilization"][0]) - 1) < 1e-3
    expected = row["lm_loss"] + 0.01 * row["router_aux_loss"] + 0.001 * row["router_z_loss"]
    assert row["loss"] == pytest.approx(expected, rel=1e-4)
    assert res.history[-1]["lm_loss"] < res.history[0]["lm_loss"]
    logged = [json.loads(l) for l in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    loaded, _, _ = load_moe(tmp_path / "out")  # the trained model reloads
    assert len(moe_layers(loaded)) == 2


def _flat(res) -> str:
    return " ".join(res.output.split())  # rich wraps long lines


def test_analyze_generate_and_cli(tiny_base, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["moe", "upcycle", "--base", str(tiny_base), "-o", str(tmp_path / "m"), "--num-experts", "4",
                              "--top-k", "1", "--set", "moe_layer_frequency=1"])
    assert res.exit_code == 0, res.output
    assert "4 experts, top-1" in _flat(res)
    data = write_jsonl(tmp_path / "a.jsonl", [{"question": f"cars {i}", "domain": "car"} for i in range(3)] +
                       [{"question": f"pasta {i}", "domain": "food"} for i in range(3)])
    res = runner.invoke(app, ["moe", "analyze", str(tmp_path / "m"), "--data", str(data)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "m" / "analysis" / "analysis.json").read_text())
    assert len(report["utilization"]) == 2 and set(report["domains"]) == {"car", "food"}
    assert all(0 < e <= report["max_entropy"] + 1e-6 for e in report["router_entropy"])
    assert (tmp_path / "m" / "analysis" / "utilization.png").stat().st_size > 1000
    res = runner.invoke(app, ["moe", "generate", str(tmp_path / "m"), "hello", "what car", "--max-tokens", "4", "--temperature", "0.8", "--top-p", "0.9"])
    assert res.exit_code == 0 and res.output.count("A:") == 2, res.output
    res = runner.invoke(app, ["moe", "upcycle", "--base", str(tiny_base), "-o", str(tmp_path / "x"), "--num-experts", "1"])
    assert res.exit_code == 2 and "must be at least top_k" in _flat(res)
    res = runner.invoke(app, ["moe", "analyze", str(tmp_path / "m"), "--data", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 2 and "not found" in _flat(res)


def test_batched_generation_matches_single(tiny_base):
    from dmoe.base import load_base
    from dmoe.generate import answer_questions

    model, tok, _ = load_base(str(tiny_base))
    upcycle(model, MoEConfig(num_experts=4, top_k=2, moe_layer_frequency=1, expert_init_noise=0.2))
    both = answer_questions(model, tok, ["a short prompt", "a much longer prompt with several more words in it"], max_new_tokens=6)
    alone = answer_questions(model, tok, ["a short prompt"], max_new_tokens=6)
    assert both[0] == alone[0]  # left padding is masked out of attention and of routing


def test_bundled_moe_config_trains_from_the_cli(tiny_base, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "moe.yaml"
    cfg = load_train_config(config, [], MoETrainConfig)
    assert cfg.moe.capacity_factor == 1.25 and cfg.moe.num_experts == 8 and cfg.max_steps == 200
    res = CliRunner().invoke(app, ["moe", "train", str(config), "--no-progress", "--set", f"model_name_or_path={tiny_base}",
                                   "--set", "max_steps=2", "--set", f"output_dir={tmp_path / 'o'}", "--set", "logging_steps=1",
                                   "--set", "moe.num_experts=2", "--set", "val_size=0", "--set", "per_device_train_batch_size=2"])
    assert res.exit_code == 0, res.output
    assert "2 steps" in _flat(res) and "drop rate" in _flat(res)
    assert (tmp_path / "o" / "moe_config.json").is_file() and (tmp_path / "o" / "summary.json").is_file()
    res = CliRunner().invoke(app, ["moe", "train", str(config), "--set", "learning_rate=-1"])
    assert res.exit_code == 2 and "learning_rate" in _flat(res)


def test_configure_optimizer_spares_norms_biases_and_routers_from_weight_decay(tiny_base):
    from dmoe.base import load_base
    from dmoe.config import MoETrainConfig
    from dmoe.train.trainer import configure_optimizer, no_weight_decay

    model, _, _ = load_base(str(tiny_base))
    upcycle(model, MoEConfig(num_experts=4, top_k=2, moe_layer_frequency=1))
    named = dict(model.named_parameters())
    cfg = MoETrainConfig(output_dir="unused", dataset="x", weight_decay=0.1)
    decay, no_decay = configure_optimizer(named, cfg).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    spared = {n for n, p in named.items() if any(p is q for q in no_decay["params"])}
    routers = {n for n in named if ".router." in n}
    norms = {n for n in named if "norm" in n}
    assert routers and norms and routers | norms <= spared
    assert not any(no_weight_decay(n, p) for n, p in named.items() if "experts" in n and n.endswith("proj.weight"))
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
