"""gguf_file.read_header, the header-only GGUF reader, against gguf-py's GGUFReader (the
reference): the same tensors (type, shape, offset, size) and the same values for the keys
asked for, on a base, a 4-bit base and a LoRA adapter; and damaged files refused by name.
The fuzzing of every GGUF reader is in tests/test_fuzz_readers.py."""

import pytest
from gguf import GGUFReader, GGUFValueType

from dmoe.base import embedded_gguf_path
from dmoe.gguf_file import GGUFFormatError, read_header, read_tensor

KEYS = {"general.architecture", "general.type", "general.name", "tokenizer.ggml.pre", "adapter.type",
        "adapter.lora.alpha", "general.alignment", "llama.block_count", "tokenizer.ggml.tokens"}


def reference(path):
    r = GGUFReader(path)
    fields = {}
    for key in KEYS:
        f = r.fields.get(key)
        if f is None or not f.types or f.types[0] == GGUFValueType.ARRAY:
            continue  # arrays are walked past, never returned
        v = f.parts[f.data[0]]
        fields[key] = bytes(v).decode() if f.types[0] == GGUFValueType.STRING else v[0].item()
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.data_offset), int(t.n_bytes))
               for t in r.tensors}
    return fields, tensors, r


@pytest.fixture(scope="module")
def adapter_gguf(tiny_experts, tiny_gguf_base, dmoe_home):
    from dmoe.experts import load_expert
    from dmoe.lora_gguf import cached_adapter_gguf

    return cached_adapter_gguf(load_expert(tiny_experts / "alpha"), tiny_gguf_base)


def test_the_header_reader_agrees_with_gguf_py(tiny_gguf_base, tiny_q4_base, adapter_gguf):
    for path in (embedded_gguf_path(), tiny_gguf_base.path, tiny_q4_base.path, adapter_gguf):
        want_fields, want_tensors, ref = reference(path)
        head = read_header(path, KEYS)
        assert head.fields == want_fields, path
        assert {n: (t.type_name, t.shape, t.offset, t.n_bytes) for n, t in head.tensors.items()} == want_tensors, path
        first = ref.tensors[0]
        assert read_tensor(path, head.tensors[first.name]).tobytes() == first.data.tobytes()
    assert read_header(embedded_gguf_path(), KEYS).fields["tokenizer.ggml.pre"]  # a string value is returned
    assert read_header(adapter_gguf, KEYS).fields["general.type"] == "adapter"


def test_damaged_files_are_refused_with_what_is_wrong(tiny_q4_base, tmp_path):
    data = tiny_q4_base.path.read_bytes()
    cases = {
        "junk.gguf": (b"PK\x03\x04" + b"\0" * 64, "not a GGUF file"),
        "empty.gguf": (b"", "is empty"),
        "cut-header.gguf": (data[:300], "damaged or cut short"),
        "cut-data.gguf": (data[:-100], "past the end of the file"),
        "version.gguf": (data[:4] + (7).to_bytes(4, "little") + data[8:], "GGUF version 7"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(GGUFFormatError, match=words):
            read_header(tmp_path / name)
