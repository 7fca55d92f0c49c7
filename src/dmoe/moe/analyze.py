"""Expert activation analysis from the router logits (generation: ``dmoe.generate``).

    report = analyze(model, tokenizer, rows)          # rows: [{"text": ..., "domain": ...}]
    write_heatmap(report, "utilization.png")

Per MoE layer: utilization (share of top-k assignments per expert over real tokens),
router entropy (mean entropy of the softmax over experts, in nats; log(E) = uniform),
and for every domain in the data the share of its tokens' assignments per expert.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from dmoe import DmoeError
from dmoe.io import read_jsonl
from dmoe.moe.model import moe_layers


class AnalyzeError(DmoeError):
    """The analysis data cannot be read."""


def read_analysis_rows(path: str | os.PathLike) -> list[dict]:
    """JSON/JSONL rows with text in ``text``, ``question``, ``instruction`` (+ ``output``) or
    ``messages``; ``domain`` optional. Errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise AnalyzeError(f"data file {p} not found")
    if p.suffix == ".json":
        try:
            items = list(enumerate(json.loads(p.read_text()), 1))
        except (json.JSONDecodeError, TypeError) as exc:
            raise AnalyzeError(f"{p}: not a JSON list of rows ({exc})") from None
    else:
        items = read_jsonl(p, AnalyzeError, what="data file")
    rows = []
    for i, r in items:
        if not isinstance(r, dict):
            raise AnalyzeError(f"{p}:{i}: expected an object")
        if "text" in r:
            text = r["text"]
        elif "messages" in r:
            text = "\n".join(m.get("content", "") for m in r["messages"])
        else:
            text = " ".join(str(r[k]) for k in ("question", "instruction", "input", "output") if r.get(k))
        if not text:
            raise AnalyzeError(f"{p}:{i}: no text (use one of text, question, instruction, messages)")
        rows.append({"text": text, "domain": str(r.get("domain", "all"))})
    if not rows:
        raise AnalyzeError(f"{p}: no rows")
    return rows


@torch.no_grad()
def analyze(model, tokenizer, rows: list[dict], batch_size: int = 8, max_length: int = 256) -> dict:
    """Router statistics over ``rows`` (see module docstring)."""
    layers = moe_layers(model)
    if not layers:
        raise AnalyzeError("the model has no MoE layers")
    e, k = layers[0].num_experts, layers[0].top_k
    for m in layers:
        m.keep_logits = True
    model.eval()
    domains = sorted({r["domain"] for r in rows})
    util = torch.zeros(len(layers), e)
    by_domain = {d: torch.zeros(len(layers), e) for d in domains}
    entropy_sum = torch.zeros(len(layers))
    n_tokens = 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            enc = tokenizer([r["text"] for r in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            mask = enc["attention_mask"].bool()
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
            row_of_token = torch.arange(len(chunk)).unsqueeze(1).expand_as(mask)[mask]  # (N_valid,)
            for li, m in enumerate(layers):
                assert m.last is not None and m.last.router_logits is not None, "the forward keeps router logits here"
                logits = m.last.router_logits.cpu()
                if logits.shape[0] != row_of_token.shape[0]:  # padding was not masked (config): keep real tokens
                    logits = logits.reshape(mask.shape[0], mask.shape[1], -1)[mask]
                probs = logits.softmax(-1)
                top = probs.topk(k, dim=-1).indices
                onehot = torch.zeros_like(probs).scatter_(1, top, 1.0)
                util[li] += onehot.sum(0)
                entropy_sum[li] += -(probs * probs.clamp_min(1e-12).log()).sum(-1).sum()
                for ri, r in enumerate(chunk):
                    by_domain[r["domain"]][li] += onehot[row_of_token == ri].sum(0)
            n_tokens += int(mask.sum())
    finally:
        for m in layers:
            m.keep_logits = False

    def shares(t: torch.Tensor) -> list[list[float]]:
        return [[round(float(x), 4) for x in row / row.sum().clamp(min=1)] for row in t]

    u = shares(util)
    return {
        "tokens": n_tokens, "num_experts": e, "top_k": k,
        "layers": [int(i) for i in _layer_numbers(model)],
        "utilization": u,
        "balance": [round(min(r) * e, 4) for r in u],  # 1.0 = perfectly even; 0 = an expert unused
        "router_entropy": [round(float(x) / max(n_tokens, 1), 4) for x in entropy_sum],
        "max_entropy": round(math.log(e), 4),
        "domains": {d: shares(t) for d, t in by_domain.items()},
    }


def _layer_numbers(model) -> list[int]:
    from dmoe.moe.layer import MoEMLP
    from dmoe.moe.model import decoder_layers

    return [i for i, layer in enumerate(decoder_layers(model)) if isinstance(getattr(layer, "mlp", None), MoEMLP)]


def write_heatmap(report: dict, path: str | os.PathLike) -> Path:
    """Expert utilization per layer (rows) and expert (columns), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = report["utilization"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * report["num_experts"], 1.2 + 0.4 * len(u)), dpi=100)
    im = ax.imshow(u, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(u)), [str(i) for i in report["layers"]])
    ax.set_xticks(range(report["num_experts"]))
    ax.set_title(f"share of top-{report['top_k']} assignments ({report['tokens']} tokens)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
