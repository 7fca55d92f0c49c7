"""Hypothesis fuzzing of every reader of a file a user (or an attacker) can hand dmoe: the
training config YAML, dataset rows (Alpaca, ShareGPT), an expert's card and
``adapter_config.json``, the router files, the keyword rules, and GGUF headers.

Each reader must answer a DmoeError with a message, or a value: never another exception,
never a hang (an alarm bounds each call), and never an allocation of the size a file
claims (tracemalloc bounds each call's peak). The budgets are small and seeded
(``derandomize``) so CI is repeatable; ``bench/fuzz.py`` runs larger ones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmoe.errors import DmoeError

EXAMPLES = int(os.environ.get("DMOE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
CALL_LIMIT_S = 10  # one reader call; a hang fails here instead of hanging CI
PEAK_LIMIT = 64 * 1024 * 1024  # bytes one reader call may allocate (files here are < 1 MB)

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=25)


class Hang(Exception):
    pass


@contextmanager
def bounded():
    """At most CALL_LIMIT_S seconds and PEAK_LIMIT bytes of Python/numpy allocations."""
    def on_alarm(*_):
        raise Hang(f"a reader ran over {CALL_LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CALL_LIMIT_S)
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
        assert peak < PEAK_LIMIT, f"a reader allocated {peak} bytes"
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(reader, *args):
    """``reader(*args)`` gives a value or a DmoeError with a message; anything else fails."""
    with bounded():
        try:
            return reader(*args)
        except DmoeError as exc:
            assert str(exc).strip(), f"{type(exc).__name__} without a message"
            return exc


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


def as_yaml(value) -> str:
    return yaml.safe_dump(value, allow_unicode=True)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ----------------------------------------------------------------------------- config YAML
def _config_keys():
    from dmoe.config import TrainConfig

    return sorted(TrainConfig.model_fields)


config_doc = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    json_value.map(as_yaml),
    st.dictionaries(st.sampled_from(_config_keys()), json_value, max_size=8).map(as_yaml),
)


@FUZZ
@given(doc=config_doc)
def test_train_config_reader(scratch, doc):
    from dmoe.config import load_train_config

    check(load_train_config, write(scratch / "config.yaml", doc))


@FUZZ
@given(override=st.text(max_size=60))
def test_config_overrides(override):
    from dmoe.config import load_train_config

    check(load_train_config, None, [override])


# ----------------------------------------------------------------------------- datasets
row = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "instruction": json_value, "input": json_value, "output": json_value, "system": json_value, "history": json_value}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | json_value,
         "content": st.text(max_size=20) | json_value}), max_size=5)}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system"]) | json_value, "value": json_value}), max_size=5)}))


@FUZZ
@given(rows=st.lists(row, max_size=6), as_list=st.booleans(), formatting=st.sampled_from(["alpaca", "sharegpt"]))
def test_dataset_rows(scratch, rows, as_list, formatting):
    from dmoe.data.formats import parse_rows, read_located_rows

    path = scratch / ("rows.json" if as_list else "rows.jsonl")
    write(path, json.dumps(rows) if as_list else "\n".join(json.dumps(r) for r in rows))

    def read(p):
        return parse_rows(read_located_rows(p), p, formatting)

    check(read, path)


@FUZZ
@given(data=st.binary(max_size=400) | st.text(max_size=400), suffix=st.sampled_from([".json", ".jsonl", ".txt"]))
def test_dataset_bytes(scratch, data, suffix):
    from dmoe.data.formats import read_located_rows

    check(read_located_rows, write(scratch / f"raw{suffix}", data))


# ----------------------------------------------------------------------------- experts
@pytest.fixture(scope="module")
def expert_dir(tiny_experts, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-expert") / "alpha"
    shutil.copytree(tiny_experts / "alpha", d)
    return d


card_doc = st.one_of(st.binary(max_size=200), json_value.map(as_yaml),
                     st.dictionaries(st.sampled_from(["name", "domain", "description", "base", "keywords", "prompts",
                                                      "scale", "rank"]), json_value, max_size=6).map(as_yaml))


@FUZZ
@given(doc=card_doc)
def test_expert_card_reader(expert_dir, doc):
    from dmoe.experts import load_expert

    original = (expert_dir / "expert.yaml").read_bytes()
    try:
        write(expert_dir / "expert.yaml", doc)
        check(load_expert, expert_dir)
    finally:
        write(expert_dir / "expert.yaml", original)


adapter_doc = st.one_of(st.binary(max_size=200), json_value.map(json.dumps),
                        st.fixed_dictionaries({"r": json_value, "lora_alpha": json_value}, optional={
                            "peft_type": json_value, "use_dora": json_value, "use_rslora": json_value,
                            "modules_to_save": json_value, "target_modules": json_value}).map(json.dumps))


@FUZZ
@given(doc=adapter_doc)
def test_adapter_config_reader(expert_dir, doc):
    from dmoe.experts import load_expert, read_peft_adapter

    original = (expert_dir / "adapter_config.json").read_bytes()
    try:
        write(expert_dir / "adapter_config.json", doc)
        check(lambda: read_peft_adapter(load_expert(expert_dir)))
    finally:
        write(expert_dir / "adapter_config.json", original)


@FUZZ
@given(data=st.binary(max_size=300))
def test_adapter_weights_reader(expert_dir, data):
    from dmoe.experts import load_expert, read_peft_adapter

    original = (expert_dir / "adapter_model.safetensors").read_bytes()
    try:
        # a safetensors header of random claims: an 8-byte length, then "JSON"
        write(expert_dir / "adapter_model.safetensors", data[:8] + data[8:] if len(data) > 8 else data)
        check(lambda: read_peft_adapter(load_expert(expert_dir)))
    finally:
        write(expert_dir / "adapter_model.safetensors", original)


# ----------------------------------------------------------------------------- routers
class FakeEncoder:
    id = "fake:8"
    dim = 8

    def encode(self, texts):
        import numpy as np

        return np.ones((len(texts), 8), np.float32) / np.sqrt(8)


def _router_meta(experts):
    from dmoe.route.router import VERSION, expert_fingerprint

    return {"version": VERSION, "classes": [e.name for e in experts] + ["none"], "encoder": FakeEncoder.id,
            "classifier": "centroid", "temperature": 0.05, "k": 10, "threshold": 0.5,
            "experts": {e.name: expert_fingerprint(e) for e in experts}, "report": {}}


router_meta = st.one_of(
    st.binary(max_size=200),
    json_value.map(json.dumps),
    st.tuples(st.sampled_from(["version", "classes", "encoder", "classifier", "temperature", "k", "threshold",
                               "experts", "report"]), json_value),
)


@FUZZ
@given(meta=router_meta, weights=st.none() | st.binary(max_size=200))
def test_router_reader(tiny_experts, tmp_path_factory, meta, weights):
    """Random router.json, or the real one with one field replaced; random router.safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    from dmoe.experts import find_experts
    from dmoe.route.router import load_router

    experts = find_experts(tiny_experts)
    d = tmp_path_factory.mktemp("router")
    if isinstance(meta, tuple):
        key, value = meta
        meta = json.dumps({**_router_meta(experts), key: value})
    write(d / "router.json", meta)
    if weights is None:
        save_file({"centroids": np.ones((len(experts) + 1, 8), np.float32)}, str(d / "router.safetensors"))
    else:
        write(d / "router.safetensors", weights)
    check(load_router, d, experts, FakeEncoder())


def test_the_unmodified_router_loads(tiny_experts, tmp_path):
    """The fuzz above starts from a router that loads (so a replaced field is what it tests)."""
    import numpy as np
    from safetensors.numpy import save_file

    from dmoe.experts import find_experts
    from dmoe.route.router import load_router

    experts = find_experts(tiny_experts)
    write(tmp_path / "router.json", json.dumps(_router_meta(experts)))
    save_file({"centroids": np.ones((len(experts) + 1, 8), np.float32)}, str(tmp_path / "router.safetensors"))
    assert load_router(tmp_path, experts, FakeEncoder()).classes[-1] == "none"


keyword_doc = st.one_of(st.binary(max_size=200), json_value.map(as_yaml), st.fixed_dictionaries(
    {"rules": st.lists(st.fixed_dictionaries({"expert": json_value, "keywords": json_value}), max_size=3)},
    optional={"default": json_value}).map(as_yaml))


@FUZZ
@given(doc=keyword_doc, query=st.text(max_size=40))
def test_keyword_rules_reader(scratch, doc, query):
    from dmoe.route.keyword import KeywordRouter

    router = check(KeywordRouter.load, write(scratch / "keywords.yaml", doc))
    if isinstance(router, KeywordRouter):
        check(router.route, query)  # rules that load also route


# ----------------------------------------------------------------------------- GGUF headers
def _gguf_header(version: int, n_tensors: int, n_kv: int, tail: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + tail


huge = st.sampled_from([0, 1, 2, 255, 2**31 - 1, 2**32, 2**48, 2**63 - 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)
gguf_doc = st.one_of(
    st.builds(_gguf_header, st.sampled_from([1, 2, 3, 4, 2**32 - 1]), huge, huge, st.binary(max_size=300)),
    # one key-value with hostile lengths: key length, key, value type, then a string/array length
    st.builds(lambda n, klen, vtype, vlen, tail: _gguf_header(3, 0, n, struct.pack("<Q", klen) + b"general.name"
                                                              + struct.pack("<IQ", vtype, vlen) + tail),
              huge, huge, st.integers(0, 20), huge, st.binary(max_size=100)),
    st.binary(max_size=200).map(lambda b: b"GGUF" + b),
)


@FUZZ
@given(data=gguf_doc)
def test_gguf_header_readers(scratch, data):
    from dmoe.base import check_gguf_file
    from dmoe.lora_gguf import read_gguf_info

    path = write(scratch / "fuzz.gguf", data)
    check(check_gguf_file, path)
    check(read_gguf_info, path)


@FUZZ
@given(cut=st.integers(0, 4096), flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), max_size=4))
def test_a_damaged_real_gguf(tiny_gguf_base, scratch, cut, flips):
    """The tiny base's GGUF with its header cut short or with bytes flipped in it."""
    real = bytearray(Path(tiny_gguf_base.path).read_bytes()[:4096])
    for at, x in flips:
        real[at] ^= x
    from dmoe.base import check_gguf_file
    from dmoe.lora_gguf import read_gguf_info

    path = write(scratch / "damaged.gguf", bytes(real[:cut]))
    check(check_gguf_file, path)
    check(read_gguf_info, path)


# ----------------------------------------------------------------------------- MCP tools
def _hostile_args(tool) -> st.SearchStrategy:
    """The tool's own argument names with any JSON values (plus, at times, an unknown one)."""
    names = sorted((tool.input_schema or {}).get("properties", {}))
    known = st.fixed_dictionaries({}, optional={n: json_value for n in names})
    return st.tuples(known, st.dictionaries(st.text(min_size=1, max_size=8), json_value, max_size=1)).map(
        lambda kv: {**kv[0], **kv[1]})


def _draws(strategy: st.SearchStrategy, n: int) -> list:
    """``n`` seeded draws of ``strategy`` (Hypothesis generates; the caller runs them)."""
    out: list = []

    @settings(FUZZ, max_examples=n)
    @given(value=strategy)
    def draw(value):
        out.append(value)

    draw()
    return out


def test_mcp_tools_answer_hostile_arguments_with_tool_errors(tiny_base, tiny_experts, tmp_path):
    """Every tool, random and hostile arguments: a result or a tool error, never a protocol
    error or a hang; the server still answers afterwards. (``model_name`` values that would
    load the embedded base are swapped for a missing path: the test is about the arguments.)"""
    import asyncio

    from mcp import Client

    from dmoe.mcp.server import build_mcp

    srv = build_mcp(experts_dir=tiny_experts, base=str(tiny_base), dataset_dir=tmp_path)
    calls: list[tuple[str, bool]] = []

    async def main():
        async with Client(srv) as c:
            tools = (await c.list_tools()).tools
            for tool in tools:
                for args in _draws(_hostile_args(tool), max(10, EXAMPLES // 6)):
                    if args.get("model_name") in ("", "embedded"):
                        args["model_name"] = str(tmp_path / "missing")
                    result = await asyncio.wait_for(c.call_tool(tool.name, args), timeout=CALL_LIMIT_S * 3)
                    calls.append((tool.name, bool(result.is_error)))
                    if result.is_error:
                        assert result.content and result.content[0].text.strip(), (tool.name, args)
            assert {t.name for t in (await c.list_tools()).tools} == {t.name for t in tools}  # still serving

    asyncio.run(main())
    tools_called = {name for name, _ in calls}
    assert len(tools_called) >= 10 and any(err for _, err in calls)
