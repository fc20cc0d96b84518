"""What several commands take alike: --json, --wait, --out, and ids given as text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.errors import NotFound
from shared.spec import Split

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow the job to its end.")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Folder to write the files into (created if missing).")]


def parse_id(text: str, kind: str) -> int:
    """``text`` as a job or run id. Raises NotFound for anything but a positive number
    that fits the id column."""
    # Ids are taken as text so that a malformed one gets the same one-line error as
    # an unknown one, not a usage screen.
    if not (text.isascii() and text.isdecimal()) or int(text) >= 2**31:
        raise NotFound(f"{kind} id {text!r} is not a positive number")
    return int(text)


def split_text(split: Split) -> str:
    """``split`` as --split takes it: ``0.8,0.1,0.1``."""
    return f"{split.train:g},{split.val:g},{split.test:g}"
