"""A GGUF file's tensor table, read from its header alone.

gguf-py's ``GGUFReader`` builds every metadata value as it opens a file: on the embedded
base, its 49,152-token vocabulary and merges cost 157 MB of RSS, for a while, in a server
that only wanted to check the file or find its tensors. ``tensor_index`` walks past the
values (only their lengths are read) except the few scalar or string ones asked for, and
returns those and where each tensor lies. gguf-py stays the reference the tests hold it to, and the source of the type
names and block sizes. No torch here: the llama.cpp engine's start-up imports this.

    head = read_header(path, keys={"general.architecture"})
    head.fields["general.architecture"]        # a requested scalar or string value
    head.tensors["blk.0.ffn_up.weight"]        # TensorEntry(type_name, shape, offset, n_bytes)
    raw = read_tensor(path, head.tensors["blk.0.ffn_up.weight"])   # its bytes, read (not mapped)
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmoe.errors import DmoeError

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(DmoeError):
    """Not a GGUF file, or one whose header is damaged or cut short; ``reason`` without the file's name."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path.name}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its GGML type name, its shape as the file gives it (in, out), its bytes."""

    type_name: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, int | float | bool | str]  # the requested keys the file has (scalars and strings)
    tensors: dict[str, TensorEntry]


def read_header(path: str | os.PathLike, keys: frozenset[str] | set[str] = frozenset()) -> GGUFHeader:
    """The values of ``keys`` (scalar or string ones) and every tensor of a GGUF v2/v3 file.
    GGUFFormatError names what is wrong: not GGUF, an unknown version, a damaged header, or
    tensor data past the end of the file (cut short)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise GGUFFormatError(path, f"the file is {'empty' if path.is_file() else 'missing'}, not a GGUF model")
    try:
        fields, index, size = _walk(path, frozenset(keys))
    except (struct.error, ValueError, KeyError, OverflowError) as exc:
        detail = "it ends inside its header" if isinstance(exc, struct.error) else str(exc)
        raise GGUFFormatError(path, f"the GGUF header is damaged or cut short: {detail}") from None
    for name, t in index.items():
        if t.offset + t.n_bytes > size:
            raise GGUFFormatError(path, f"tensor {name} ends at byte {t.offset + t.n_bytes}, past the end of "
                                        f"the file ({size} bytes): the file is cut short")
    return GGUFHeader(fields, index)


def tensor_index(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of a GGUF file (``read_header(path).tensors``)."""
    return read_header(path).tensors


def read_tensor(path: str | os.PathLike, t: TensorEntry) -> np.ndarray:
    """A tensor's raw bytes (uint8), read into memory: not a map of the file."""
    return np.fromfile(path, dtype=np.uint8, count=t.n_bytes, offset=t.offset)


def _walk(path: Path, keys: frozenset[str]) -> tuple[dict, dict[str, TensorEntry], int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)
        if mm[:4] != b"GGUF":
            raise GGUFFormatError(path, "not a GGUF file (it does not start with 'GGUF')")
        pos = 4

        def take(fmt: str):
            nonlocal pos
            (value,) = struct.unpack_from(fmt, mm, pos)
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")  # (not ``pos += take(...)``: that adds to pos as it was before take moved it)
            if pos + n > size:
                raise ValueError(f"a string of {n} bytes at byte {pos} runs past the end")
            pos += n
            return bytes(mm[pos - n:pos]).decode("utf-8", "replace")

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == _STRING:
                string()
            elif vtype == _ARRAY:
                etype, count = take("<I"), take("<Q")
                if etype in _SCALAR:
                    pos += count * struct.calcsize(_SCALAR[etype])
                else:
                    for _ in range(count):  # each element reads at least 8 bytes: ends at the file's end
                        skip(etype)
            elif vtype in _SCALAR:
                pos += struct.calcsize(_SCALAR[vtype])
            else:
                raise ValueError(f"metadata value type {vtype} is not one of GGUF's")
            if pos > size:
                raise ValueError(f"a metadata value runs past the end (byte {pos} of {size})")

        version = take("<I")
        if version not in (2, 3):
            raise GGUFFormatError(path, f"GGUF version {version}; dmoe reads versions 2 and 3")
        n_tensors, n_kv = take("<Q"), take("<Q")
        fields: dict = {}
        for _ in range(n_kv):
            key, vtype = string(), take("<I")
            if (key in keys or key == "general.alignment") and vtype in _SCALAR:
                fields[key] = take(_SCALAR[vtype])
            elif key in keys and vtype == _STRING:
                fields[key] = string()
            else:
                skip(vtype)
        alignment = fields.get("general.alignment", 32)
        if "general.alignment" not in keys:
            fields.pop("general.alignment", None)
        if not 0 < alignment < 2**20:
            raise ValueError(f"general.alignment {alignment}")
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(take("<Q") for _ in range(n_dims))
            infos.append((name, dims, take("<I"), take("<Q")))
        data_start = -(-pos // alignment) * alignment
    out = {}
    for name, dims, ttype, offset in infos:
        qtype = GGMLQuantizationType(ttype)
        block, type_size = GGML_QUANT_SIZES[qtype]
        out[name] = TensorEntry(qtype.name, dims, data_start + offset, math.prod(dims) // block * type_size)
    return fields, out, size
