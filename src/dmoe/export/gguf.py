"""Whole models as GGUF for llama.cpp: an HF base (or a merged expert) written with the
``gguf`` package. Adapters are written by :mod:`dmoe.lora_gguf` (re-exported here).

    write_base_gguf("path/to/hf_dir", "base-f32.gguf", outtype="f32")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

from dmoe.lora_gguf import (  # noqa: F401 - the adapter half, re-exported for `dmoe export`
    _PERMUTED_ARCHS,
    BASE_ARCHS,
    BASE_OUTTYPES,
    OUTTYPES,
    ExportError,
    ExportReport,
    GGUFInfo,
    add_tensor,
    check_adapter_fits,
    gguf_arch,
    permute_rope_rows,
    qtype,
    read_gguf_info,
    write_adapter_gguf,
    write_gguf,
)


# ------------------------------------------------------------------ bases
def _vocab_kv(writer, directory: Path, config: dict, pre: str | None) -> list[str]:
    """Tokenizer metadata for a BPE (GPT-2 style) tokenizer; returns notes for the user."""
    from transformers import AutoTokenizer  # heavy: only an export pays for it

    g = gguf
    notes = []
    tok = AutoTokenizer.from_pretrained(str(directory))
    vocab = tok.get_vocab()
    n_vocab = int(config.get("vocab_size") or len(vocab))
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(g.TokenType.CONTROL if added[t].special else g.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(g.TokenType.NORMAL)
    if pre is None:
        pre = _source_gguf_pre(directory)
    if pre is None:
        pre = "default"
        notes.append("tokenizer.ggml.pre unknown for this tokenizer: wrote 'default' (pass --pre NAME for llama.cpp's name)")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = g.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError(f"{directory}: no BPE merges found; only BPE (GPT-2 style) tokenizers are exported")
    special.add_to_gguf(writer)
    return notes


def _source_gguf_pre(directory: Path) -> str | None:
    """The pre-tokenizer name of the GGUF an HF directory was converted from (dmoe's cache), if any."""
    src = directory / "dmoe_source.json"
    if not src.is_file():
        return None
    path = json.loads(src.read_text()).get("gguf")
    if not path or not Path(path).is_file():
        return None
    from dmoe.gguf_file import read_header

    pre = read_header(path, {"tokenizer.ggml.pre"}).fields.get("tokenizer.ggml.pre")
    return str(pre) if pre is not None else None


def write_base_gguf(directory: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", pre: str | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> ExportReport:
    """Write an HF model directory (llama or qwen2 family) as a llama.cpp base GGUF.

    ``state_dict`` replaces the directory's weights (a merged model); the config and the
    tokenizer still come from ``directory``."""
    g = gguf
    qtype(outtype, BASE_OUTTYPES)
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    arch = gguf_arch(config)
    if arch not in BASE_ARCHS:
        raise ExportError(f"{directory}: dmoe writes {', '.join(sorted(BASE_ARCHS))} bases as GGUF, not {arch}; "
                          "use llama.cpp's convert_hf_to_gguf.py (adapters of this base export with dmoe export EXPERT)")
    rope = dict(config.get("rope_parameters") or {})  # transformers 5 keeps theta and scaling here
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ExportError(f"{directory}: RoPE scaling {scaling} is not exported by dmoe; use llama.cpp's converter")
    rope_theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    if state_dict is None:
        state_dict = {}
        for f in sorted(directory.glob("*.safetensors")):
            state_dict.update(load_file(str(f)))
        if not state_dict:
            raise ExportError(f"{directory}: no *.safetensors weights (dmoe never unpickles .bin files)")
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    tmap = g.get_tensor_name_map(g.MODEL_ARCH[arch.upper()], n_layers)
    out = Path(out)
    report = ExportReport(out, 0)

    def fill(w) -> None:
        w.add_type(g.GGUFType.MODEL)
        w.add_name(config.get("_name_or_path") or directory.name)
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope_theta)
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(int(config["vocab_size"]))
        w.add_file_type({"f32": g.LlamaFileType.ALL_F32, "f16": g.LlamaFileType.MOSTLY_F16,
                         "bf16": g.LlamaFileType.MOSTLY_BF16, "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": g.LlamaFileType.MOSTLY_Q4_0, "q4_1": g.LlamaFileType.MOSTLY_Q4_1}[outtype])
        report.fallbacks.extend(_vocab_kv(w, directory, config, pre))
        tied = config.get("tie_word_embeddings", False)
        for hf_name in sorted(state_dict):
            t = state_dict[hf_name]
            if hf_name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            if "rotary_emb" in hf_name:
                continue
            name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ExportError(f"{directory}: tensor {hf_name} has no GGUF name for architecture {arch}")
            if arch in _PERMUTED_ARCHS and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                t = permute_rope_rows(t, n_head if "q_proj" in hf_name else n_kv)
            add_tensor(w, name, t, outtype, report)

    write_gguf(out, arch, fill)
    return report
