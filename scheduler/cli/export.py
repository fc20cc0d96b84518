"""Exporting a stored model: ``captrain export MODEL --format onnx|ddddocr --out DIR``.

The work is the worker side's (workers.export), imported lazily: like ``predict``,
export needs the worker extra, and the scheduler imports without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from scheduler.cli.args import JsonOpt
from scheduler.cli.render import console, emit, err_console
from shared.errors import ConfigError

commands = typer.Typer()


@commands.command()
def export(
    model: Annotated[str, typer.Argument(
        help="NAME, NAME@VERSION, NAME@ALIAS, a run id or latest.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Folder to write into: new, or empty unless --force.")],
    fmt: Annotated[str, typer.Option(
        "--format", help="onnx (model.onnx + captrain.json, for onnxruntime and "
                         "captrain serve) or ddddocr (model.onnx + charsets.json).")
    ] = "onnx",
    quantize: Annotated[str, typer.Option(
        "--quantize", help="none, or int8: onnxruntime static quantization, calibrated "
                           "on training items, kept only if it reads held-out items "
                           "within 1 point of fp32.")] = "none",
    force: Annotated[bool, typer.Option(
        "--force", help="Write into a non-empty folder, replacing the export's files.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a trained model as ONNX for use outside captrain, checked before it is kept."""
    try:
        from workers.export import export_model
    except ImportError as exc:
        raise ConfigError(
            f"export needs the worker extra (pip install 'captrain[worker]'): {exc}"
        ) from exc

    def say(step: str) -> None:
        if not as_json:
            err_console.print(f"{step}...", highlight=False)

    report = export_model(model, fmt, out, force, say, quantize)
    if as_json:
        emit(report, True)
    else:
        console.print(summary(report), highlight=False, soft_wrap=True)


def summary(report: dict[str, Any]) -> str:
    """One line for people: what went where, and how well it reads."""
    m, v = report["model"], report["verification"]
    who = (f"{m['name']}@{m['version']} (run {m['run']})" if m.get("name")
           else f"run {m['run']}")
    line = (f"exported {who}, {report['arch']}, as {report['format']} to {report['out']}: "
            f"max |diff| {v['max_abs_diff']:.2g}, argmax agreement "
            f"{v['argmax_agreement']:.4f} at batch sizes "
            f"{', '.join(str(b) for b in v['batch_sizes'])}")
    if "text_agreement" in v:
        line += (f"; {v['reader']} reads {v['text_agreement']:.1%} of {v['images']} fresh "
                 "captchas as captrain does")
    if q := v.get("quantization"):
        line += (f"; quantized to int8 ({q['int8_bytes'] / q['fp32_bytes']:.0%} of the "
                 f"size): {q['seq_acc_int8']:.1%} of {q['items']} held-out items read "
                 f"right, fp32 {q['seq_acc_fp32']:.1%}")
    return line
