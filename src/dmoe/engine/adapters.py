"""Adapter residency: PEFT LoRA adapters copied into the engine's preallocated slots.

Each projection (LoRASlice) of the model gets stacked buffers A (S, r, in), B (S, r, out) for
``max_loras`` slots, where r is the largest rank loaded so far (smaller ranks are
zero-padded; the buffers grow, up to ``max_rank``, when a larger one arrives: padding
every slot to the maximum allowed rank would multiply the LoRA cost for nothing).
Loading an adapter validates *everything* first (format, base identity, module names,
shapes, rank, finite values) and only then writes its slot, so a bad adapter changes
nothing. The adapter's alpha/r (or alpha/sqrt(r) with rsLoRA) is folded into B, so a
request's scale is only its own blend weight. Reading and validating (``prepare``)
need no lock; writing a slot (``commit``) runs under the engine's lock, between decode
steps, so no forward pass ever sees a half-written slot.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch

from dmoe.engine.model import LoRALinear, LoRASlice, Transformer
from dmoe.engine.protocol import Resident
from dmoe.errors import AdapterError, AdapterInUseError, ExpertNotLoadedError
from dmoe.experts import Expert, read_peft_adapter


def lora_modules(model: Transformer) -> dict[str, LoRASlice]:
    """'layers.3.q_proj' -> its LoRASlice (the HF module names PEFT adapters use)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRASlice)}


@dataclass
class PreparedAdapter:
    """A validated adapter, cast and laid out for the slots: {module: (A (r, in), B^T * scaling (r, out))}."""

    name: str
    path: str
    rank: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]


class AdapterSlots:
    """Which adapter sits in which slot, and the stacked buffers behind them."""

    def __init__(self, model: Transformer, max_loras: int, max_rank: int):
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.modules = lora_modules(model)
        self.linears = [m for m in model.modules() if isinstance(m, LoRALinear)]
        self.rank = 0  # the buffers' rank: the largest rank loaded so far
        self.dtype = next(model.parameters()).dtype  # the slots' dtype (use_dtype: fp32 with --lora-dtype float32)
        self.resident: dict[str, Resident] = {}

    def _grow(self, rank: int) -> None:
        """Reallocate every layer's buffers at ``rank``, keeping the loaded slots. A fused
        layer (q|k|v, gate|up) holds its parts' slots in one A (S, P, r, in) and one
        block-diagonal B (S, P, r, out); each part's A (S, r, in) and B (S, r, out_j) are views."""
        p = next(self.model.parameters())
        for lin in self.linears:
            n_parts, d_in = len(lin.parts), lin.parts[0].in_features
            d_out = sum(part.out_features for part in lin.parts)
            A = torch.zeros(self.max_loras, n_parts, rank, d_in, dtype=self.dtype, device=p.device)
            B = torch.zeros(self.max_loras, n_parts, rank, d_out, dtype=self.dtype, device=p.device)
            if lin.A is not None and lin.B is not None:
                A[:, :, :self.rank].copy_(lin.A)
                B[:, :, :self.rank].copy_(lin.B)
            lin.set_slots(A, B)
            start = 0
            for j, part in enumerate(lin.parts):
                part.A = A[:, j]
                part.B = B[:, j, :, start:start + part.out_features]
                start += part.out_features
        self.rank = rank

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Keep the slots in ``dtype`` from now on (loaded adapters are converted). fp32 slots
        over a bf16 model (``--lora-dtype float32``) keep the adapters' weights unrounded, for
        twice the slots' memory. CPU decode steps run the C kernel either way (fp32 sums);
        prefills run the LoRA ops on MKL's sgemm (measured on the torch ops, before the kernel:
        docs/benchmarks.md)."""
        if dtype == self.dtype:
            return
        self.dtype = dtype
        if self.rank:
            self._grow(self.rank)  # new buffers, the loaded slots copied across (copy_ converts)

    def free_slots(self) -> list[int]:
        used = {r.slot for r in self.resident.values()}
        return [s for s in range(self.max_loras) if s not in used]

    def prepare(self, expert: Expert) -> "PreparedAdapter":
        """Read and validate ``expert`` without touching any slot (safe outside the engine lock)."""
        tensors, r, scaling = read_peft_adapter(expert)
        if r > self.max_rank:
            raise AdapterError(f"expert '{expert.name}': rank {r} exceeds the engine's max rank {self.max_rank}; restart with a larger --max-lora-rank")
        for mod, (A, B) in tensors.items():
            target = self.modules.get(mod)
            if target is None:
                raise AdapterError(f"expert '{expert.name}': module {mod} does not exist in this base model")
            if A.shape != (r, target.in_features) or B.shape != (target.out_features, r):
                raise AdapterError(
                    f"expert '{expert.name}': {mod} has shapes A{tuple(A.shape)} B{tuple(B.shape)}, expected "
                    f"A({r}, {target.in_features}) B({target.out_features}, {r}): built for another base"
                )
        dtype = self.dtype
        ready = {mod: (A.to(dtype), (B * scaling).T.contiguous().to(dtype)) for mod, (A, B) in tensors.items()}
        return PreparedAdapter(expert.name, str(expert.path), r, ready)

    def commit(self, prepared: "PreparedAdapter", in_use: AbstractSet[int] = frozenset()) -> Resident:
        """Write a prepared adapter into a free slot (replacing a same-named one not in use).
        Only copies: this is the part that runs under the engine lock, between two steps."""
        name, r = prepared.name, prepared.rank
        old = self.resident.get(name)
        if old is not None and old.slot in in_use:
            raise AdapterInUseError(f"expert '{name}' is in use by queued or running requests; reload it when they finish, or load it under another name")
        free = self.free_slots() if old is None else [old.slot]
        if not free:
            raise AdapterError(f"all {self.max_loras} adapter slots are taken; unload an expert or restart with more --max-loras")
        slot = free[0]
        if r > self.rank:
            self._grow(r)
        for mod, m in self.modules.items():
            assert m.A is not None and m.B is not None  # allocated by _grow
            m.A[slot].zero_()
            m.B[slot].zero_()
            if mod in prepared.tensors:
                A, Bt = prepared.tensors[mod]
                m.A[slot, :r].copy_(A)
                m.B[slot, :r].copy_(Bt)
        res = Resident(name, slot, r, prepared.path, sorted(prepared.tensors))
        self.resident[name] = res
        return res

    def load(self, expert: Expert, in_use: AbstractSet[int] = frozenset()) -> Resident:
        """prepare + commit."""
        return self.commit(self.prepare(expert), in_use)

    def unload(self, name: str, in_use: AbstractSet[int] = frozenset()) -> None:
        res = self.resident.get(name)
        if res is None:
            raise ExpertNotLoadedError(f"expert '{name}' is not loaded; loaded experts: {', '.join(sorted(self.resident)) or 'none'}")
        if res.slot in in_use:
            raise AdapterInUseError(f"expert '{name}' is in use by queued or running requests; unload it when they finish")
        for m in self.modules.values():  # a free slot holds zeros, so the dense kernel may span it
            assert m.A is not None and m.B is not None
            m.A[res.slot].zero_()
            m.B[res.slot].zero_()
        del self.resident[name]
