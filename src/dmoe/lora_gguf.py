"""llama.cpp's LoRA adapter format: written from a PEFT adapter, read back, checked
against a base, and cached for the llama.cpp engine. Shared by ``dmoe.export`` (the
``dmoe export`` command) and ``dmoe.engine.llamacpp``, so neither imports the other.

    write_adapter_gguf(expert, "cooking.gguf", base=spec, outtype="f16")
    check_adapter_fits("cooking.gguf", "base.gguf")

llama.cpp's adapter format (what its ``convert_lora_to_gguf.py`` writes):
  general.type = adapter, adapter.type = lora, adapter.lora.alpha (f32),
  general.architecture = the base's; tensors ``blk.N.<name>.weight.lora_a`` (PEFT's A,
  torch shape (r, in), so ggml ne = [in, r]) and ``...lora_b`` (PEFT's B, (out, r)).
llama.cpp scales each pair by alpha / r, with r read from the tensor; dmoe writes
alpha = scaling * r, so rsLoRA (scaling = alpha / sqrt r) comes out right too.

llama.cpp stores a llama-architecture base's q and k rows permuted for its RoPE
layout; the same permutation must be applied to the rows of q/k ``lora_b``, or the
adapter silently does something else.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from dmoe.base import BaseSpec, hf_meta_dir
from dmoe.errors import AdapterError, DmoeError
from dmoe.experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Expert, read_peft_adapter
from dmoe.io import clean_stale, content_hash, dmoe_home, file_lock, stamp_matches, without_torch_here, write_stamp

if TYPE_CHECKING:  # converting an adapter reads it with torch; a cached one is served without torch
    import torch

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
BASE_OUTTYPES = OUTTYPES + ("q4_0", "q4_1")  # a whole base may be 4-bit (what llama.cpp and ``serve --int4`` read)
_PERMUTED_ARCHS = {"llama"}  # architectures whose base q/k rows llama.cpp permutes
_HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2",  # HF model_type -> GGUF arch
             "gemma3_text": "gemma3", "gemma3": "gemma3"}  # Gemma-3: NEOX RoPE in llama.cpp, no q/k row permutation
BASE_ARCHS = {"llama", "qwen2"}  # whole bases dmoe itself writes (Gemma's norms and embeddings need llama.cpp's converter)
_PROJ_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class ExportError(DmoeError):
    """An adapter or base cannot be written as GGUF as asked."""


@dataclass
class ExportReport:
    """What was written, and which tensors fell back to another type (with the reason)."""

    path: Path
    tensors: int
    alpha: float | None = None
    fallbacks: list[str] = field(default_factory=list)


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (HF's rotate-half halves -> interleaved pairs), per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qtype(outtype: str, allowed: tuple[str, ...] = OUTTYPES):
    g = gguf
    if outtype not in allowed:
        raise ExportError(f"outtype must be one of {', '.join(allowed)}, not {outtype!r}")
    return {"f32": g.GGMLQuantizationType.F32, "f16": g.GGMLQuantizationType.F16,
            "bf16": g.GGMLQuantizationType.BF16, "q8_0": g.GGMLQuantizationType.Q8_0,
            "q4_0": g.GGMLQuantizationType.Q4_0, "q4_1": g.GGMLQuantizationType.Q4_1}[outtype]


def add_tensor(writer, name: str, t: torch.Tensor, outtype: str, report: ExportReport) -> None:
    """Add one tensor at ``outtype``; 1-D tensors stay f32, and q8_0/q4_0/q4_1 need rows that
    are multiples of 32 (the block size): other shapes fall back to f16, recorded in the report."""
    g = gguf
    arr = t.detach().float().contiguous().numpy()
    if arr.ndim == 1:
        outtype = "f32"
    if outtype in ("q8_0", "q4_0", "q4_1") and arr.shape[-1] % 32:
        report.fallbacks.append(f"{name}: rows of {arr.shape[-1]} are not a multiple of 32 ({outtype} block size); written as f16")
        outtype = "f16"
    if outtype == "f32":
        writer.add_tensor(name, arr)
    elif outtype == "f16":
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        q = qtype(outtype, BASE_OUTTYPES)
        writer.add_tensor(name, g.quants.quantize(arr, q), raw_dtype=q)
    report.tensors += 1


def write_gguf(out: Path, arch: str, fill) -> None:
    """A GGUF at ``out``: ``fill(writer)`` adds the keys and tensors; written to a temporary
    file in the same folder, then renamed, so a crash never leaves a half-written file."""
    g = gguf
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)  # what a killed writer of this file left
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        w = g.GGUFWriter(tmp, arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC and not exc.filename:  # numpy's write names no file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def hf_config(base: BaseSpec) -> dict:
    return json.loads((hf_meta_dir(base) / "config.json").read_text())


def gguf_arch(config: dict) -> str:
    """The GGUF architecture name for an HF config (refused clearly when llama.cpp's name is unknown here)."""
    mt = config.get("model_type", "?")
    if mt not in _HF_ARCHS:
        raise ExportError(f"model_type {mt!r} has no GGUF mapping in dmoe; supported: {', '.join(sorted(_HF_ARCHS))}")
    return _HF_ARCHS[mt]


# ------------------------------------------------------------------ adapters
def _projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of a llama/qwen2-style decoder layer."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    return {"q_proj": (n_head * head_dim, hidden), "k_proj": (n_kv * head_dim, hidden), "v_proj": (n_kv * head_dim, hidden),
            "o_proj": (hidden, n_head * head_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def adapter_tensors(expert: Expert, config: dict) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{gguf base tensor name: (A (r, in), B (out, r))} in llama.cpp's layout, and the alpha to write."""
    g = gguf
    try:
        pairs, rank, scaling = read_peft_adapter(expert)
    except AdapterError as exc:
        raise ExportError(str(exc)) from None
    arch = gguf_arch(config)
    n_layers = int(config["num_hidden_layers"])
    tmap = g.get_tensor_name_map(g.MODEL_ARCH[arch.upper()], n_layers)
    n_head, n_kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    shapes = _projection_shapes(config)
    out = {}
    for mod, (A, B) in pairs.items():
        _, layer, proj = mod.split(".")
        if int(layer) >= n_layers or proj not in _PROJ_PARENT:
            raise ExportError(f"expert '{expert.name}': {mod} does not exist in a {n_layers}-layer {arch} base")
        want_out, want_in = shapes[proj]
        if A.shape[1] != want_in or B.shape[0] != want_out:
            raise ExportError(f"expert '{expert.name}': {mod} maps {A.shape[1]} -> {B.shape[0]}, the base's maps "
                              f"{want_in} -> {want_out}: the adapter was made for another base")
        name = tmap.get_name(f"model.layers.{layer}.{_PROJ_PARENT[proj]}.{proj}")
        if name is None:
            raise ExportError(f"expert '{expert.name}': no GGUF tensor name for {mod} in architecture {arch}")
        if arch in _PERMUTED_ARCHS and proj in ("q_proj", "k_proj"):
            B = permute_rope_rows(B, n_head if proj == "q_proj" else n_kv)
        out[f"{name}.weight"] = (A, B)
    return out, scaling * rank


def write_adapter_gguf(expert: Expert, out: str | os.PathLike, base: BaseSpec, outtype: str = "f16") -> ExportReport:
    """Write ``expert`` as a llama.cpp LoRA adapter GGUF over ``base`` (atomically)."""
    g = gguf
    qtype(outtype)
    config = hf_config(base)
    tensors, alpha = adapter_tensors(expert, config)
    arch = gguf_arch(config)
    out = Path(out)
    report = ExportReport(out, 0, alpha)

    def fill(w) -> None:
        w.add_type(g.GGUFType.ADAPTER)
        w.add_string(g.Keys.Adapter.TYPE, "lora")
        w.add_float32(g.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(expert.name)
        for name in sorted(tensors):
            A, B = tensors[name]
            add_tensor(w, f"{name}.lora_a", A, outtype, report)
            add_tensor(w, f"{name}.lora_b", B, outtype, report)

    write_gguf(out, arch, fill)
    return report


# ------------------------------------------------------------------ checks of GGUF files
@dataclass(frozen=True)
class GGUFInfo:
    """The few facts dmoe checks before handing a GGUF to llama.cpp."""

    kind: str  # general.type: "model" | "adapter" | ...
    arch: str
    adapter_type: str | None
    alpha: float | None
    shapes: dict[str, tuple[int, ...]]  # tensor name -> ggml ne (innermost first)


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Read a GGUF's header (type, architecture, tensor shapes); a file that is not GGUF is an ExportError."""
    from dmoe.gguf_file import GGUFFormatError, read_header

    keys = {"general.type", "general.architecture", "adapter.type", "adapter.lora.alpha"}
    try:
        head = read_header(path, keys)  # not gguf-py's GGUFReader: it builds a base's whole vocabulary (gguf_file.py)
    except (GGUFFormatError, OSError) as exc:
        raise ExportError(f"{path} is not a readable GGUF file ({exc})") from None
    f = head.fields
    shapes = {name: t.shape for name, t in head.tensors.items()}
    alpha, adapter_type = f.get("adapter.lora.alpha"), f.get("adapter.type")
    return GGUFInfo(str(f.get("general.type") or "model"), str(f.get("general.architecture") or "?"),
                    None if adapter_type is None else str(adapter_type), None if alpha is None else float(alpha), shapes)


def check_adapter_fits(adapter: str | os.PathLike, base: str | os.PathLike) -> GGUFInfo:
    """Refuse, before llama.cpp sees it, an adapter GGUF that is not a LoRA adapter, or whose
    architecture or tensor shapes do not match the base GGUF (llama.cpp may abort the process)."""
    a, b = read_gguf_info(adapter), read_gguf_info(base)
    if a.kind != "adapter" or a.adapter_type != "lora":
        raise ExportError(f"{adapter} is not a LoRA adapter GGUF (general.type={a.kind!r}, adapter.type={a.adapter_type!r}); "
                          "export one with: dmoe export EXPERT --format gguf")
    if b.kind == "adapter":
        raise ExportError(f"{base} is an adapter GGUF, not a base model")
    if a.arch != b.arch:
        raise ExportError(f"adapter {adapter} is for architecture {a.arch!r}, the base {base} is {b.arch!r}")
    for name, shape in a.shapes.items():
        target = name.rsplit(".", 1)[0]
        if target not in b.shapes:
            raise ExportError(f"adapter tensor {name} has no base tensor {target} in {base}")
        base_in, base_out = b.shapes[target][0], b.shapes[target][1]
        if name.endswith(".lora_a") and shape[0] != base_in:
            raise ExportError(f"adapter tensor {name} has {shape[0]} inputs, the base's {target} has {base_in}: made for another base")
        if name.endswith(".lora_b") and shape[1] != base_out:
            raise ExportError(f"adapter tensor {name} has {shape[1]} outputs, the base's {target} has {base_out}: made for another base")
    return a


def _write_cached(expert_dir: str, out: str, base_path: str) -> None:
    from dmoe.base import resolve_base
    from dmoe.experts import load_expert

    try:
        write_adapter_gguf(load_expert(expert_dir), out, resolve_base(base_path), "f32")
    except ExportError as exc:
        raise AdapterError(str(exc)) from None


def cached_adapter_gguf(expert: Expert, base: BaseSpec) -> Path:
    """The expert as a GGUF adapter (f32, so the only difference from torch is the base's
    quantisation), converted once and cached under ``$DMOE_HOME/gguf-adapters`` by the
    adapter's and the base's content. Failures are AdapterErrors (nothing is cached)."""
    key = content_hash([expert.path / ADAPTER_CONFIG, expert.path / ADAPTER_WEIGHTS])[:16]
    path = dmoe_home() / "gguf-adapters" / f"{expert.name}-{key}-{base.identity.sha256[:12]}-f32.gguf"
    digest = path.with_name(path.name + ".digest")
    # One converter at a time per entry (two servers starting together); the digest, written
    # after the file, marks it complete and catches a file cut or changed later: rebuilt.
    with file_lock(path.with_name(f".{path.name}.lock")):
        if stamp_matches(path, digest):
            return path
        if path.exists():
            log.warning("rebuilding %s: it does not match the digest written with it", path)
        # a child interpreter where this process has no torch (the llama.cpp engine's server)
        without_torch_here("dmoe.lora_gguf:_write_cached", str(expert.path), str(path), str(base.path), error=AdapterError)
        write_stamp(path, digest)
    return path
