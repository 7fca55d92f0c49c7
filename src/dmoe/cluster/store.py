"""Experts reach every node through Ray's object store, not a shared filesystem.

The gateway reads an expert's files once (:func:`pack_expert`) and ``ray.put``s the
:class:`ExpertBlob`; a replica fetches it, checks the bytes against the fingerprint the
gateway registered and against the expert's own manifest, and unpacks it into a folder of
its own (:func:`unpack_expert`). No pickled code crosses: a blob is names and bytes.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from dmoe.errors import ExpertError, ExpertFetchError
from dmoe.experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD_FILE, Expert, load_expert
from dmoe.io import MANIFEST, atomic_dir

log = logging.getLogger("dmoe.cluster.store")
SHIPPED = (CARD_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)  # what serving needs; logs and plots stay home


@dataclass(frozen=True)
class ExpertBlob:
    """An expert as bytes: its name, its serving files, and their fingerprint."""

    name: str
    files: dict[str, bytes]
    fingerprint: str

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def fingerprint(name: str, files: dict[str, bytes]) -> str:
    """SHA-256 over the name and each file's name and bytes, in name order."""
    h = hashlib.sha256(name.encode())
    for rel in sorted(files):
        h.update(b"\0" + rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()


def pack_expert(expert: Expert) -> ExpertBlob:
    """Read the files a replica needs to serve ``expert`` (the card, the adapter, its manifest)."""
    files = {}
    for rel in SHIPPED:
        p = expert.path / rel
        if p.is_file():
            files[rel] = p.read_bytes()
    return ExpertBlob(expert.name, files, fingerprint(expert.name, files))


def unpack_expert(blob: object, want_name: str, want_fingerprint: str, root: Path) -> Expert:
    """The expert a fetched blob holds, written under ``root`` and loaded with every check
    :func:`dmoe.experts.load_expert` makes. A blob that is not what the gateway registered
    (another name, other bytes) is refused before anything is written."""
    if not isinstance(blob, ExpertBlob):
        raise ExpertFetchError(f"expert '{want_name}': the object store gave a {type(blob).__name__}, not an expert's files; "
                               "register the expert again (POST /v1/experts)")
    if blob.name != want_name or fingerprint(blob.name, blob.files) != want_fingerprint:
        raise ExpertFetchError(f"expert '{want_name}': the fetched files do not match the fingerprint the gateway registered "
                               f"({want_fingerprint[:12]}); register the expert again (POST /v1/experts)")
    bad = [rel for rel in blob.files if rel not in SHIPPED]
    if bad:
        raise ExpertError(f"expert '{want_name}': unexpected files {bad} in its blob; only {', '.join(SHIPPED)} are shipped")
    target = root / f"{blob.name}-{blob.fingerprint[:16]}"
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            for rel, data in blob.files.items():
                (tmp / rel).write_bytes(data)
    expert = load_expert(target)
    if expert.name != want_name:
        shutil.rmtree(target, ignore_errors=True)
        raise ExpertError(f"the expert registered as '{want_name}' is named '{expert.name}' in its card")
    return expert
