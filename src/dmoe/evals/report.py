"""A benchmark run as people read it: a self-contained report.html, and run-vs-run diffs.

    write_report(Path("results/run-1"))          # -> results/run-1/report.html
    compare_runs(Path("results/a"), Path("results/b"))

The report embeds its plots as PNG data URIs (matplotlib, Agg), so the one file can be
mailed or attached to a ticket: hit rate per domain and mode, bleed per mode, tokens/s
per mode, the latency distribution per mode, the metrics table, and the side-by-side
answers.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from dmoe.evals.behaviour import BenchError
from dmoe.io import atomic_write_text, read_json_file, read_jsonl, verify_manifest


def _load(run: Path) -> dict:
    f = Path(run) / "summary.json"
    if not f.is_file():
        raise BenchError(f"{run} is not a benchmark run: summary.json is missing")
    verify_manifest(Path(run), BenchError, names=("summary.json", "answers.jsonl", "comparison.jsonl"),
                    fix="Run the benchmark again.")
    return read_json_file(f, BenchError, what="benchmark summary")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(summary: dict, answers: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary["modes"])
    domains = sorted({d for m in summary["modes"].values() for d in m["hits"]})
    out = []
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(modes), 1)
    for j, mode in enumerate(modes):
        rates = [(summary["modes"][mode]["hits"].get(d) or {}).get("rate") or 0 for d in domains]
        ax.bar([i + j * width for i in range(len(domains))], rates, width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("hit rate")
    ax.legend(fontsize=7, ncol=2)
    out.append(("Hit rate per domain and mode", _png(fig)))
    plt.close(fig)
    for title, key, label in (("Bleed on off-domain questions", "bleed", "bleed rate"), ("Throughput", "tokens_per_s", "tokens/s")):
        fig, ax = plt.subplots(figsize=(8, 3))
        vals = [(m[key].get("rate") or 0) if key == "bleed" else (m[key] or 0) for m in summary["modes"].values()]
        ax.bar(modes, vals, color="tab:red" if key == "bleed" else "tab:blue")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=7)
        out.append((title, _png(fig)))
        plt.close(fig)
    lat = [[a["latency_s"] * 1e3 for a in answers if a["mode"] == m and a["latency_s"] and not a["error"]] for m in modes]
    if any(lat):
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.boxplot([x or [0] for x in lat], tick_labels=modes)
        ax.set_ylabel("request latency, ms")
        ax.tick_params(axis="x", labelsize=7)
        out.append(("Latency distribution", _png(fig)))
        plt.close(fig)
    return out


def _metrics_row(name: str, m: dict) -> str:
    e = html.escape
    hits = ", ".join(f"{e(d)} {r['hits']}/{r['n']}" for d, r in m["hits"].items())
    routing = f"{m['routing_accuracy']['hits']}/{m['routing_accuracy']['n']}" if m["routing_accuracy"] else ""
    cells = [e(name), hits, f"{m['bleed']['hits']}/{m['bleed']['n']}", routing, m["mean_output_tokens"], m["tokens_per_s"],
             m["ttft_ms"]["p50"], f"{m['latency_ms']['p50']} / {m['latency_ms']['p95']}", m["errors"]]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def write_report(run: Path) -> Path:
    """Write ``run/report.html`` from the run's summary, answers and comparison files."""
    run = Path(run)
    summary = _load(run)
    read = lambda name: [r for _, r in read_jsonl(run / name, BenchError)] if (run / name).is_file() else []  # noqa: E731
    answers, comparison = read("answers.jsonl"), read("comparison.jsonl")
    e = html.escape
    rows = "".join(_metrics_row(name, m) for name, m in summary["modes"].items())
    plots = "".join(f"<h2>{e(t)}</h2><img alt='{e(t)}' src='{src}'>" for t, src in _plots(summary, answers))
    modes = list(summary["modes"])
    side = "".join(
        f"<tr><td>{e(r['question'])}<br><small>{e(r['domain'])}</small></td>"
        + "".join("<td>" + e(str(r.get(m, ""))) + "</td>" for m in modes) + "</tr>"
        for r in comparison)
    heads = "".join("<th>" + e(m) + "</th>" for m in modes)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>dmoe bench: {e(run.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}.bad{{color:#b00}}</style></head><body>
<h1>dmoe bench: {e(run.name)}</h1>
<p class="{'bad' if summary['status'] != 'complete' else ''}">status: {e(summary['status'])} · {summary['questions']} questions ×
{summary['repeat']} · {summary['parallel']} in flight · {e(summary['url'])} · {e(json.dumps(summary['params']))}</p>
<h2>Metrics</h2><table><tr><th>mode</th><th>hits per domain</th><th>bleed</th><th>routing</th><th>mean tokens</th>
<th>tokens/s</th><th>TTFT p50 ms</th><th>latency p50 / p95 ms</th><th>errors</th></tr>{rows}</table>
{plots}
<h2>Answers side by side</h2><table><tr><th>question</th>{heads}</tr>{side}</table>
</body></html>"""
    out = run / "report.html"
    atomic_write_text(out, doc)
    return out


def compare_runs(a: Path, b: Path) -> list[dict]:
    """What changed from run ``a`` to run ``b``, per mode and metric (modes present in both)."""
    sa, sb = _load(a), _load(b)
    rows = []
    for mode in [m for m in sa["modes"] if m in sb["modes"]]:
        ma, mb = sa["modes"][mode], sb["modes"][mode]
        for d in sorted(set(ma["hits"]) | set(mb["hits"])):
            ra, rb = ma["hits"].get(d), mb["hits"].get(d)
            rows.append({"mode": mode, "metric": f"hits {d}", "a": ra and f"{ra['hits']}/{ra['n']}", "b": rb and f"{rb['hits']}/{rb['n']}",
                         "delta": round((rb["rate"] or 0) - (ra["rate"] or 0), 4) if ra and rb else None})
        for metric, get in (("bleed", lambda m: m["bleed"]["rate"]), ("tokens/s", lambda m: m["tokens_per_s"]),
                            ("latency p50 ms", lambda m: m["latency_ms"]["p50"]), ("errors", lambda m: m["errors"])):
            va, vb = get(ma), get(mb)
            rows.append({"mode": mode, "metric": metric, "a": va, "b": vb,
                         "delta": round(vb - va, 4) if va is not None and vb is not None else None})
    only = sorted(set(sa["modes"]) ^ set(sb["modes"]))
    if only:
        rows.append({"mode": ", ".join(only), "metric": "only in one run", "a": None, "b": None, "delta": None})
    return rows
