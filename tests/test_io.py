"""dmoe.io: atomic writes leave the old content or the new, never half; one JSONL reader
that names the file and line."""

from __future__ import annotations

import json

import pytest

from dmoe.errors import DmoeError
from dmoe.io import atomic_dir, atomic_write_bytes, atomic_write_text, read_jsonl


class Boom(RuntimeError):
    pass


def test_atomic_write_replaces_whole_and_leaves_no_temp_files(tmp_path):
    f = tmp_path / "sub" / "a.txt"
    atomic_write_text(f, "old")
    atomic_write_bytes(f, b"new")
    assert f.read_bytes() == b"new"
    assert sorted(p.name for p in f.parent.iterdir()) == ["a.txt"]


def test_atomic_dir_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise Boom()
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "model.bin").write_bytes(b"1")
    assert (target / "model.bin").read_bytes() == b"1"
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "model.bin").write_bytes(b"2")
    assert (target / "model.bin").read_bytes() == b"2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target) as tmp:  # replace=False and the target exists (a lost race): the existing copy stays
        (tmp / "model.bin").write_bytes(b"3")
    assert (target / "model.bin").read_bytes() == b"2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_jsonl_names_the_line_editors_show(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n{broken\n")
    with pytest.raises(DmoeError, match=r"rows.jsonl:4: line 4 is not valid JSON"):
        read_jsonl(f)
    assert read_jsonl(f, torn_tail_ok=True) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(DmoeError, match="questions file .* not found"):
        read_jsonl(tmp_path / "nope.jsonl", what="questions file")
    with pytest.raises(DmoeError, match="is not a file"):
        read_jsonl(tmp_path)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DmoeError, match="not UTF-8"):
        read_jsonl(tmp_path / "bin.jsonl")
