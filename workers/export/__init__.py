"""Exporting a stored model for use outside captrain: :func:`export_model`.

Formats (README "Export" has the contract of each):

- ``onnx``: ``model.onnx`` and ``captrain.json``, for onnxruntime in any language
  and for ``captrain serve`` (onnx_format.py);
- ``ddddocr``: ``model.onnx`` and ``charsets.json``, a custom model for the ddddocr
  package (ddddocr_format.py).

Every export is checked before it is kept: onnxruntime against torch at two batch
sizes, and for ddddocr its own reading against captrain's; an int8 export
(``--quantize int8``, quantize.py) also reads held-out items as well as fp32 does.
The files are written in
a scratch folder and moved into ``out`` only after the checks pass, so a refusal or
a failed check leaves ``out`` as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, SpecError

FORMATS = ("onnx", "ddddocr")
QUANTIZE = ("none", "int8")
# What each format writes, and so what --force may replace in a non-empty folder.
FILES = {"onnx": ("model.onnx", "captrain.json"), "ddddocr": ("model.onnx", "charsets.json")}
EXPORT_FILES = frozenset(f for names in FILES.values() for f in names)


def check_format(fmt: str) -> None:
    """Raise SpecError for a format that is not one of FORMATS."""
    if fmt not in FORMATS:
        raise SpecError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")


def check_quantize(quantize: str) -> None:
    """Raise SpecError for a ``--quantize`` that is not one of QUANTIZE."""
    if quantize not in QUANTIZE:
        raise SpecError(f"unknown --quantize {quantize!r}: choose {' or '.join(QUANTIZE)}")


def check_out(out: Path, force: bool) -> None:
    """Refuse an ``out`` that is a file, or a folder with anything in it unless
    ``force``. Raises SpecError."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SpecError(f"--out {out} is a folder with files in it; give a new or empty "
                        "folder, or --force to replace the export's files there")


def export_model(ref: str, fmt: str, out: Path, force: bool = False,
                 say: Callable[[str], None] | None = None, quantize: str = "none"
                 ) -> dict[str, Any]:
    """Export the model ``ref`` names (shared.lookup.find_model) as ``fmt`` into the
    folder ``out``, checked first; ``say`` hears each step, for people. ``quantize``
    "int8" writes the graph quantized, after it read held-out items as well as fp32
    (workers/export/quantize.py).

    With ``force``, a non-empty ``out`` is written into: the export's files
    (EXPORT_FILES) there are replaced or removed, other files stay.

    Returns the report: format, folder, files, model identity, verification figures.
    Raises SpecError for the format, the folder or a model the format cannot carry;
    ConfigError without the worker extra (torch, onnx, onnxruntime);
    NotFound for an unknown model; ArtifactError for weights that fail their check or
    an export that fails its own; StateError without stored items to check against.
    """
    tell = say or (lambda _msg: None)
    check_format(fmt)
    check_quantize(quantize)
    check_out(out, force)
    # Imported here, after the cheap checks: this module itself needs no torch, so
    # the CLI refuses a bad format or folder at once, and says what to install.
    try:
        from workers.export.ddddocr_format import write_ddddocr
        from workers.export.onnx_format import write_onnx
        from workers.export.source import load_stored
    except ImportError as exc:
        raise ConfigError(f"export needs the worker extra (pip install "
                          f"'captrain[worker]'): {exc}") from exc
    stored = load_stored(ref, fmt)
    tell(f"loaded the model of run {stored.run_id} ({stored.cfg.arch})")
    writer = write_onnx if fmt == "onnx" else write_ddddocr
    with tempfile.TemporaryDirectory(prefix="captrain-export-") as scratch:
        verification = writer(stored, Path(scratch), tell, quantize)
        _place(Path(scratch), out, FILES[fmt])
    return {"format": fmt, "quantize": quantize, "out": str(out), "files": list(FILES[fmt]),
            "model": stored.identity, "arch": stored.cfg.arch,
            "verification": verification}


def _place(scratch: Path, out: Path, names: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in EXPORT_FILES - set(names):  # another format's file, left by --force
        (out / stale).unlink(missing_ok=True)
    for name in names:
        shutil.move(str(scratch / name), str(out / name))
