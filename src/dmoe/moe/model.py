"""Sparse upcycling of an HF causal LM (Komatsuzaki et al. 2022), and saving/loading the result.

    model = upcycle(dense_model, MoEConfig(num_experts=8, top_k=2))   # in place; returns the model
    save_moe(model, tokenizer, "saves/moe")
    model, tokenizer, cfg = load_moe("saves/moe")

The chosen decoder layers' ``mlp`` modules become ``MoEMLP``s (experts = copies of
the MLP, a new fp32 router). Nothing else in the HF model changes, so the forward
pass, ``generate``, gradient checkpointing and the KV cache work as before. A
forward pre-hook on the decoder hands the attention mask to the MoE layers, which
use it to leave padding out of routing and of the router losses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from dmoe import DmoeError
from dmoe.config import MoEConfig
from dmoe.moe.layer import MoEMLP, RouterStats

MOE_CONFIG_FILE = "moe_config.json"
WEIGHTS_FILE = "model.safetensors"


class MoEError(DmoeError):
    """A model cannot be upcycled, saved or loaded as asked."""


def decoder_layers(model) -> nn.ModuleList:
    """The transformer blocks of an HF causal LM (Llama/Qwen/Gemma ``layers``, GPT-2 ``h``)."""
    base = model.base_model
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    decoder = getattr(base, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    raise MoEError(f"{type(model).__name__}: no decoder layer list found (looked for layers, h, blocks, decoder.layers)")


def moe_layer_indices(n_layers: int, cfg: MoEConfig) -> list[int]:
    """Layers ``start, start+freq, ...`` up to ``moe_layer_end`` (inclusive; None = the last)."""
    end = n_layers - 1 if cfg.moe_layer_end is None else cfg.moe_layer_end
    if cfg.moe_layer_start >= n_layers:
        raise MoEError(f"moe_layer_start {cfg.moe_layer_start} is past the model's {n_layers} layers (0..{n_layers - 1})")
    if end >= n_layers:
        raise MoEError(f"moe_layer_end {end} is past the model's {n_layers} layers (0..{n_layers - 1})")
    return list(range(cfg.moe_layer_start, end + 1, cfg.moe_layer_frequency))


def moe_layers(model) -> list[MoEMLP]:
    """The model's MoE layers, in depth order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def _hand_mask_to_moe(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        mask = None  # a 4-D mask is already expanded; routing then sees every position
    for layer in module._dmoe_moe_layers:
        layer.token_mask = mask


def _install_hook(model) -> None:
    base = model.base_model
    base._dmoe_moe_layers = moe_layers(model)
    if not getattr(base, "_dmoe_hooked", False):
        base.register_forward_pre_hook(_hand_mask_to_moe, with_kwargs=True)
        base._dmoe_hooked = True


def upcycle(model, cfg: MoEConfig):
    """Replace the chosen MLPs with MoE layers, in place; returns ``model``."""
    layers = decoder_layers(model)
    hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0))
    if moe_layers(model):
        raise MoEError("this model is already a MoE (it has MoE layers); load it with load_moe")
    gen = torch.Generator().manual_seed(cfg.seed)
    for i in moe_layer_indices(len(layers), cfg):
        mlp = getattr(layers[i], "mlp", None)
        if mlp is None:
            raise MoEError(f"decoder layer {i} ({type(layers[i]).__name__}) has no 'mlp' module to upcycle")
        layers[i].mlp = MoEMLP(mlp, hidden, cfg, gen)
    model.config.dmoe_moe = cfg.model_dump()
    _install_hook(model)
    return model


def collect_stats(model) -> list[RouterStats]:
    """Each MoE layer's stats from the last forward pass."""
    return [m.last for m in moe_layers(model) if m.last is not None]


def router_losses(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, z) averaged over the MoE layers of the last forward pass."""
    stats = collect_stats(model)
    if not stats:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack([s.aux_loss for s in stats]).mean(), torch.stack([s.z_loss for s in stats]).mean()


def parameter_counts(model) -> dict[str, int]:
    """Total parameters, and those active for one token (top-k of each MoE layer's experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        inactive += per_expert * (layer.num_experts - layer.top_k)
    return {"total": total, "active_per_token": total - inactive}


# ------------------------------------------------------------------ save / load
def save_moe(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """safetensors weights + HF config + ``moe_config.json`` + tokenizer, written atomically."""
    layers = moe_layers(model)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if layers:  # a dense model (a benchmark baseline) is saved without it, so it is not loaded as a MoE
            (tmp / MOE_CONFIG_FILE).write_text(json.dumps(layers[0].cfg.model_dump(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):  # file by file: logs and plots already in ``out`` stay
            os.replace(f, out / f.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_moe_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / MOE_CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def load_moe(path: str | os.PathLike, dtype=torch.float32, device: str = "cpu"):
    """(model, tokenizer, MoEConfig) from a ``save_moe`` directory; outputs equal the saved model's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not is_moe_dir(p):
        raise MoEError(f"{p} is not a dmoe MoE directory (needs {MOE_CONFIG_FILE} and {WEIGHTS_FILE}); make one with: dmoe moe upcycle")
    cfg = MoEConfig(**json.loads((p / MOE_CONFIG_FILE).read_text()))
    config = AutoConfig.from_pretrained(str(p))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    upcycle(model, cfg.model_copy(update={"expert_init_noise": 0.0}))
    missing, unexpected = load_model(model, str(p / WEIGHTS_FILE), strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise MoEError(f"{p}: weights do not match the MoE config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device=device, dtype=dtype)
    for layer in moe_layers(model):
        layer.router.float()  # the router stays fp32 whatever the model's dtype
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(p))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, cfg
