"""GGUF export: the adapter file's keys, names, orientation and RoPE permutation; base
export; merge; and every refusal the issue lists. llama.cpp itself is in test_llamacpp.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import hand_copy
from dmoe.base import resolve_base
from dmoe.cli import app
from dmoe.experts import load_expert
from dmoe.export.gguf import (
    ExportError,
    check_adapter_fits,
    permute_rope_rows,
    read_gguf_info,
    write_adapter_gguf,
    write_base_gguf,
)

gguf = pytest.importorskip("gguf")


def _tensors(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float32)
        out[t.name] = data.reshape([int(x) for x in reversed(t.shape)])
    return out


def _field(path: Path, key: str):
    f = gguf.GGUFReader(str(path)).fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0].item()


def test_permutation_matches_llama_cpp_convention():
    # llama.cpp's permute: per head, rows [0..d/2) and [d/2..d) are interleaved pairwise.
    w = torch.arange(8).float().reshape(8, 1)  # one head, head_dim 8
    assert permute_rope_rows(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    w2 = torch.arange(16).float().reshape(16, 1)  # two heads
    assert permute_rope_rows(w2, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_adapter_gguf_layout(tiny_base, tiny_experts, tmp_path):
    base = resolve_base(tiny_base)
    expert = load_expert(tiny_experts / "alpha")
    out = tmp_path / "alpha.gguf"
    report = write_adapter_gguf(expert, out, base, "f32")
    assert _field(out, "general.type") == "adapter"
    assert _field(out, "adapter.type") == "lora"
    assert _field(out, "general.architecture") == "llama"
    cfg = expert.adapter_config()
    assert report.alpha == pytest.approx(cfg["lora_alpha"])  # plain LoRA: alpha as trained
    assert abs(_field(out, "adapter.lora.alpha") - cfg["lora_alpha"]) < 1e-6
    t = _tensors(out)
    peft = load_file(str(expert.path / "adapter_model.safetensors"))
    a = peft["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    # PEFT's A (r, in) and B (out, r) are stored as they are: ggml ne = [in, r] and [r, out]
    assert np.allclose(t["blk.1.ffn_down.weight.lora_a"], a.numpy())
    assert np.allclose(t["blk.1.ffn_down.weight.lora_b"], b.numpy())
    # q and k: B's rows carry llama.cpp's RoPE permutation (4 heads for q, 2 kv heads for k)
    bq = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    bk = peft["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert np.allclose(t["blk.0.attn_q.weight.lora_b"], permute_rope_rows(bq, 4).numpy())
    assert np.allclose(t["blk.0.attn_k.weight.lora_b"], permute_rope_rows(bk, 2).numpy())
    assert not np.allclose(t["blk.0.attn_q.weight.lora_b"], bq.numpy())
    # v is not permuted
    bv = peft["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert np.allclose(t["blk.0.attn_v.weight.lora_b"], bv.numpy())
    assert report.tensors == len(t) == len(peft)


def _copy_expert(src: Path, dst: Path, **config_changes) -> Path:
    hand_copy(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_rslora_alpha_gives_the_same_scale(tiny_base, tiny_experts, tmp_path):
    base = resolve_base(tiny_base)
    src = load_expert(tiny_experts / "alpha")
    r, alpha = src.adapter_config()["r"], src.adapter_config()["lora_alpha"]
    rs = load_expert(_copy_expert(src.path, tmp_path / "rs", use_rslora=True))
    report = write_adapter_gguf(rs, tmp_path / "rs.gguf", base, "f32")
    # llama.cpp scales by alpha_gguf / r; rsLoRA's scale is alpha / sqrt(r)
    assert report.alpha / r == pytest.approx(alpha / r ** 0.5)


def test_refusals(tiny_base, tiny_experts, tmp_path):
    base = resolve_base(tiny_base)
    src = load_expert(tiny_experts / "alpha")
    with pytest.raises(ExportError, match="modules_to_save"):
        write_adapter_gguf(load_expert(_copy_expert(src.path, tmp_path / "mts", modules_to_save=["lm_head"])), tmp_path / "x.gguf", base)
    with pytest.raises(ExportError, match="outtype must be one of f32, f16, bf16, q8_0"):
        write_adapter_gguf(src, tmp_path / "x.gguf", base, "q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_q8_0_falls_back_per_tensor_and_says_so(tiny_base, tiny_experts, tmp_path):
    base = resolve_base(tiny_base)
    report = write_adapter_gguf(load_expert(tiny_experts / "alpha"), tmp_path / "q.gguf", base, "q8_0")
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    types = {t.name: t.tensor_type for t in r.tensors}
    # lora_a rows are the base's inputs (32 or 64: multiples of 32) -> q8_0; lora_b rows are r=4 -> f16
    assert types["blk.0.attn_q.weight.lora_a"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight.lora_b"] == gguf.GGMLQuantizationType.F16
    assert report.fallbacks and all("not a multiple of 32" in f and "f16" in f for f in report.fallbacks)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    report = write_base_gguf(tiny_base, out, "f32")
    assert any("tokenizer.ggml.pre" in n for n in report.fallbacks)  # a random dir has no source GGUF
    return out


def test_base_export_round_trip(tiny_base, tiny_gguf):
    info = read_gguf_info(tiny_gguf)
    assert info.kind == "model" and info.arch == "llama"
    t = _tensors(tiny_gguf)
    sd = load_file(str(next(tiny_base.glob("*.safetensors"))))
    assert np.allclose(t["blk.0.attn_q.weight"], permute_rope_rows(sd["model.layers.0.self_attn.q_proj.weight"], 4).numpy())
    assert np.allclose(t["blk.1.ffn_gate.weight"], sd["model.layers.1.mlp.gate_proj.weight"].numpy())
    assert np.allclose(t["output.weight"], sd["lm_head.weight"].numpy())  # untied head is written
    assert _field(tiny_gguf, "tokenizer.ggml.model") == "gpt2"
    assert _field(tiny_gguf, "llama.attention.head_count_kv") == 2


def test_adapter_checks_before_llama_cpp(tiny_base, tiny_experts, tiny_gguf, tmp_path):
    base = resolve_base(tiny_base)
    adapter = tmp_path / "alpha.gguf"
    write_adapter_gguf(load_expert(tiny_experts / "alpha"), adapter, base, "f16")
    assert check_adapter_fits(adapter, tiny_gguf).alpha
    # a base model given as the adapter
    with pytest.raises(ExportError, match="is not a LoRA adapter GGUF"):
        check_adapter_fits(tiny_gguf, tiny_gguf)
    # the embedded 576-wide base: shapes do not match the tiny adapter
    with pytest.raises(ExportError, match="made for another base"):
        check_adapter_fits(adapter, resolve_base(None).path)
    # not a GGUF at all
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ExportError, match="not a readable GGUF"):
        check_adapter_fits(junk, tiny_gguf)


def test_architecture_mismatch_is_refused(tiny_base, tiny_experts, tiny_gguf, tmp_path):
    adapter = tmp_path / "a.gguf"
    write_adapter_gguf(load_expert(tiny_experts / "alpha"), adapter, resolve_base(tiny_base), "f32")
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ExportError, match="architecture 'qwen2'.*'llama'"):
        check_adapter_fits(tmp_path / "qwen.gguf", tiny_gguf)


def test_merge_equals_the_adapter(tiny_base, tiny_experts, tmp_path):
    from transformers import AutoModelForCausalLM

    from dmoe.base import load_base
    from dmoe.experts import apply_expert
    from dmoe.export.merge import merge_expert

    expert = load_expert(tiny_experts / "beta")
    out = merge_expert(expert, tmp_path / "merged", str(tiny_base), scale=0.5)
    merged = AutoModelForCausalLM.from_pretrained(out)
    model, _, _ = load_base(str(tiny_base))
    ref = apply_expert(model, expert, 0.5)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-5)
    with pytest.raises(ExportError, match="already exists"):
        merge_expert(expert, out, str(tiny_base))


def _flat(res) -> str:
    return " ".join(res.output.split())  # rich wraps long lines


def test_cli_export_and_errors(tiny_base, tiny_experts, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tiny_experts / "gamma"), "--base", str(tiny_base), "--outtype", "q8_0",
                              "-o", str(tmp_path / "g.gguf"), "--experts", str(tiny_experts)])
    assert res.exit_code == 0, res.output
    assert "wrote" in _flat(res) and "more tensors like these" in _flat(res)
    assert read_gguf_info(tmp_path / "g.gguf").kind == "adapter"
    res = runner.invoke(app, ["export", "base", "--base", str(tiny_base), "-o", str(tmp_path / "b.gguf")])
    assert res.exit_code == 0, res.output
    assert read_gguf_info(tmp_path / "b.gguf").kind == "model"
    res = runner.invoke(app, ["export", "base"])  # the embedded base is GGUF already
    assert res.exit_code == 2 and "already a GGUF" in _flat(res)
    res = runner.invoke(app, ["export", "gamma", "--base", str(tiny_base), "--experts", str(tiny_experts), "--outtype", "q4"])
    assert res.exit_code == 2 and "outtype must be one of" in _flat(res)
    res = runner.invoke(app, ["export", "nope", "--base", str(tiny_base), "--experts", str(tiny_experts)])
    assert res.exit_code == 2 and "nope" in _flat(res)


def test_modules_to_save_tensors_are_refused(tiny_base, tiny_experts, tmp_path):
    src = load_expert(tiny_experts / "alpha")
    dst = _copy_expert(src.path, tmp_path / "extra")
    sd = load_file(str(dst / "adapter_model.safetensors"))
    sd["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(4, 4)
    save_file(sd, str(dst / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match="unexpected tensor"):
        write_adapter_gguf(load_expert(dst), tmp_path / "x.gguf", resolve_base(tiny_base))


def test_adapter_for_another_base_is_refused_on_export(tiny_experts, tmp_path):
    with pytest.raises(ExportError, match="made for another base"):
        write_adapter_gguf(load_expert(tiny_experts / "alpha"), tmp_path / "x.gguf", resolve_base(None))
    assert not (tmp_path / "x.gguf").exists()
