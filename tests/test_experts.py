import json
import os

import pytest

from dmoe.base import BaseIdentity
from dmoe.config import ExpertCard
from dmoe.experts import ExpertError, check_base, find_experts, load_expert, resolve_expert, write_card


def make_expert(root, name, sha="a" * 64):
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(b"")
    write_card(d, ExpertCard(name=name, domain=name, base={"name": "b", "sha256": sha}))
    return d


def test_find_and_resolve_by_name(tmp_path):
    make_expert(tmp_path, "cars")
    make_expert(tmp_path, "food")
    assert [e.name for e in find_experts(tmp_path)] == ["cars", "food"]
    assert resolve_expert("food", [tmp_path]).path == tmp_path / "food"


def test_unknown_expert_is_an_error_listing_known(tmp_path):
    make_expert(tmp_path, "cars")
    with pytest.raises(ExpertError, match="unknown expert 'boats'; known experts: cars"):
        resolve_expert("boats", [tmp_path])


def test_paths_outside_roots_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = make_expert(tmp_path, "evil")
    with pytest.raises(ExpertError, match="outside the expert roots"):
        resolve_expert(str(root / ".." / "evil"), [root])
    os.symlink(outside, root / "link")
    with pytest.raises(ExpertError, match="outside the expert roots"):
        resolve_expert(str(root / "link"), [root])
    inside = make_expert(root, "good")
    assert resolve_expert(str(inside), [root]).name == "good"


def test_base_mismatch_is_refused(tmp_path):
    e = load_expert(make_expert(tmp_path, "cars", sha="a" * 64))
    check_base(e, BaseIdentity("b", "a" * 64))
    with pytest.raises(ExpertError, match="trained on base"):
        check_base(e, BaseIdentity("other", "b" * 64))


def test_pickled_adapters_are_refused(tmp_path):
    d = make_expert(tmp_path, "cars")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ExpertError, match="safetensors only"):
        load_expert(d)


def test_incomplete_directory_names_missing_file(tmp_path):
    d = make_expert(tmp_path, "cars")
    (d / "adapter_config.json").unlink()
    with pytest.raises(ExpertError, match="adapter_config.json is missing"):
        load_expert(d)


def test_duplicate_names_are_refused(tmp_path):
    make_expert(tmp_path, "a")
    d = make_expert(tmp_path, "b")
    write_card(d, ExpertCard(name="a", base={"name": "b", "sha256": "0"}))
    with pytest.raises(ExpertError, match="two experts are named 'a'"):
        find_experts(tmp_path)
