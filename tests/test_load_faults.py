"""Sustained load with faults for 60 s against a real `dmoe serve` process on the tiny model
(bench/load_faults.py runs 10 minutes on the embedded base): 1.5x capacity, a mixed traffic
of auto / experts / blends / lora ids / the global default, streamed or not, a tenth of the
clients dropping mid-stream, an expert hot-unloaded and loaded every 10 s and the global
lora scales changed every 15 s. No 5xx, sampled greedy replies equal to the same request
alone, all slots free and the counters adding up at the end, no RSS growth after warm-up."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_faults.py"


def test_sustained_load_with_faults(tiny_base, tiny_experts, dmoe_home, tmp_path):
    spec = importlib.util.spec_from_file_location("load_faults", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    result = bench.run(tiny_experts, base=str(tiny_base), duration=60, seed=0, max_batch=2, max_queue=4,
                       max_tokens=(4, 24), capacity_s=8, workdir=tmp_path)
    failed = bench.goals(result)
    assert failed == [], (failed, {k: v for k, v in result.items() if k != "sample_mismatches"},
                          result["sample_mismatches"][:3])
    assert result["faults"]["hot_reloads"] >= 5 and result["faults"]["lora_changes"] >= 3
    assert result["disconnected_mid_stream"] > 0 and result["sampled_replies"] > 0
    assert result["server_exit"] in (0, -15) and result["server_tracebacks"] == 0  # SIGTERM: a clean drain
