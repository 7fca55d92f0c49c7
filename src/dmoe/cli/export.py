"""``dmoe export`` and ``dmoe merge``: GGUF adapters and bases, merged standalone models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from dmoe.cli.common import BASE_HELP, console, err_console, experts_dirs, experts_option, roots_for, user_errors
from dmoe.errors import DmoeError

if TYPE_CHECKING:
    from dmoe.lora_gguf import ExportReport


def _print_export(report: "ExportReport") -> None:
    for note in report.fallbacks[:3]:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    if len(report.fallbacks) > 3:
        err_console.print(f"[yellow]note:[/] ... and {len(report.fallbacks) - 3} more tensors like these", highlight=False)
    alpha = f", adapter.lora.alpha {report.alpha:g}" if report.alpha is not None else ""
    console.print(f"[green]wrote {report.path}[/]: {report.tensors} tensors{alpha}", highlight=False)


@user_errors
def export(
    expert: str = typer.Argument(..., help="expert name or path, or the word 'base' to export the base model itself"),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp)"),
    outtype: str = typer.Option("f16", help="f32, f16, bf16 or q8_0; for the base also q4_0 or q4_1 (what serve --int4 reads packed)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="output file (default: next to the expert / in the current folder)"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    pre: Optional[str] = typer.Option(None, help="llama.cpp pre-tokenizer name when exporting the base (default: from the source)"),
    experts: Optional[list[Path]] = experts_option("where expert names are looked up (default: $DMOE_EXPERTS or ./examples/experts)"),
):
    """Write an expert as a llama.cpp LoRA adapter GGUF, or (EXPERT = base) the base model as a GGUF.

    Example: dmoe export cooking --format gguf --outtype f16
    Example: dmoe export base --base path/to/hf_dir -o base-f16.gguf
    """
    from dmoe.base import resolve_base
    from dmoe.experts import check_base, resolve_expert  # torch, gguf: only when exporting
    from dmoe.export.gguf import write_adapter_gguf, write_base_gguf

    if fmt != "gguf":
        raise DmoeError(f"--format must be gguf, not {fmt!r}")
    spec = resolve_base(base)
    if expert == "base":
        if spec.is_gguf:
            raise DmoeError(f"the base is already a GGUF file: {spec.path}; llama.cpp loads it as it is")
        target = out or Path(f"{spec.identity.name}-{outtype}.gguf")
        report = write_base_gguf(spec.path, target, outtype, pre=pre)
    else:
        e = resolve_expert(expert, roots_for(experts_dirs(experts), expert))
        check_base(e, spec.identity)
        target = out or (e.path / f"{e.name}-{outtype}.gguf")
        report = write_adapter_gguf(e, target, spec, outtype)
    _print_export(report)


@user_errors
def merge(
    expert: str = typer.Argument(..., help="expert name or path"),
    out: Path = typer.Option(..., "-o", "--out", help="output HF model directory (must not exist)"),
    scale: float = typer.Option(1.0, help="adapter scale merged in"),
    fmt: str = typer.Option("hf", "--format", help="hf (safetensors directory), or gguf: also write OUT/model-OUTTYPE.gguf"),
    outtype: str = typer.Option("f16", help="GGUF type with --format gguf: f32, f16, bf16, q8_0, q4_0 or q4_1"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    experts: Optional[list[Path]] = experts_option("where expert names are looked up (default: $DMOE_EXPERTS or ./examples/experts)"),
):
    """Merge an expert into the base: a standalone model (HF safetensors, optionally GGUF).

    Example: dmoe merge cooking -o merged/cooking --format gguf
    """
    from dmoe.experts import resolve_expert  # torch, transformers: only when merging
    from dmoe.export.gguf import write_base_gguf
    from dmoe.export.merge import merge_expert

    if fmt not in ("hf", "gguf"):
        raise DmoeError(f"--format must be hf or gguf, not {fmt!r}")
    e = resolve_expert(expert, roots_for(experts_dirs(experts), expert))
    directory = merge_expert(e, out, base, scale)
    console.print(f"[green]merged {e.name} (scale {scale:g}) into {directory}[/]", highlight=False)
    if fmt == "gguf":
        _print_export(write_base_gguf(directory, directory / f"model-{outtype}.gguf", outtype))
