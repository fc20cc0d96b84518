"""The dataset kinds: one table of what each kind of dataset means to the system.

Planning, the train job, prediction, augmentation and reports read a kind's rules
from here instead of testing its name. Torch-free: the scheduler reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import StateError
from shared.spec import IMAGE_MODELS, TABULAR_MODELS

# The grey that moves in at the edges when an augmentation shifts or rotates a
# captcha: its light background (ImageCaptcha paints it 238-255 per channel; about
# 240 once grey). MNIST digits are white on black, so they take 0.
CAPTCHA_FILL = 240


@dataclass(frozen=True)
class Kind:
    """The rules of one dataset kind."""

    name: str
    modality: str  # "image", "audio" or "table": what one item is
    models: tuple[str, ...]  # the models that can learn it
    # How a user's file becomes model input: "resize" (captchas), "mnist" (a digit
    # photo prepared the MNIST way), "audio" (a WAV clip) or "" (no files: tables).
    preprocess: str
    default_scale: float | None = None  # of the image the model sees; None: n/a
    fill: int = CAPTCHA_FILL  # augmentation's edge grey (see CAPTCHA_FILL)
    reportable: bool = True  # `captrain report` can show a run on it
    explorable: bool = False  # `captrain explore` knows it
    builtin: bool = False  # ships with the code; registered on first use

    @property
    def images(self) -> bool:
        return self.modality == "image"


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("captcha", "image", IMAGE_MODELS, "resize", default_scale=0.5),
        Kind("imported", "image", IMAGE_MODELS, "resize", default_scale=0.5),
        Kind("mnist", "image", IMAGE_MODELS, "mnist", default_scale=1.0, fill=0),
        Kind("audio", "audio", IMAGE_MODELS, "audio"),
        Kind("iris", "table", TABULAR_MODELS, "", reportable=False, explorable=True,
             builtin=True),
    )
}
EXPLORABLE = tuple(name for name, k in KINDS.items() if k.explorable)


def kind_of(name: str) -> Kind:
    """The rules of dataset kind ``name``. Raises StateError for a kind this version
    does not know (a row written by a newer captrain)."""
    try:
        return KINDS[name]
    except KeyError:
        raise StateError(f"dataset kind {name!r} is unknown to this captrain") from None


def image_input_size(kind: str, height: int, width: int, scale: float | None
                     ) -> tuple[int, int]:
    """The model input (height, width) for a dataset of ``kind`` with images of
    ``width`` x ``height``: scaled by ``scale``, by default the kind's own scale."""
    factor = scale or kind_of(kind).default_scale or 1.0
    return max(8, round(height * factor)), max(8, round(width * factor))
