"""Training-time augmentation: seeded random distortions of uint8 model inputs.

A model trained on one generator's exact output learns its quirks; small random
rotations, shifts, shears, warps and changes of brightness and contrast make it read
the same text drawn a little differently. Presets (``ModelConfig.augment``):

- ``none``: inputs as decoded;
- ``light``: a small affine (±4°, shifts up to 3 % across and 8 % down, 93-103 %
  scale, shear) and brightness/contrast jitter;
- ``strong``: a larger affine, a perspective warp on half and an elastic warp on a
  third of the images, a slight blur on a fifth, and stronger jitter.

Audio (log-mel spectrograms) gets SpecAugment-style masking instead: bands of mel
rows and spans of frames set to silence. An affine would move energy between
frequencies, which changes what was said.

Only the train split is augmented, inside the loader (``ShardLoader``), so that on a
GPU machine the work happens in DataLoader worker processes. Every call takes a seed
and leaves the global RNG as it was: the loader seeds it from (seed, epoch, group),
so a resumed run sees the same distortions whichever process made them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torchvision.transforms import v2

from shared.kinds import CAPTCHA_FILL

Preset = Literal["none", "light", "strong"]
PRESETS: tuple[str, ...] = ("none", "light", "strong")
# Captchas fill their width (the first glyph starts 1-2 px from the edge), so the
# presets shift little sideways and hardly enlarge.
# Pixels an affine or warp moves in from outside the image (shared.kinds).
FILL = CAPTCHA_FILL
# torchvision's v2 transforms draw one set of parameters per call, and each call
# costs about 30-200 µs whatever its size (one thread, 30×80 px). Calling them per
# image would cost as much as the training step on a CPU; per chunk of 8 images it
# is about 60 µs an image for ``light``, and the draws still differ between chunks,
# batches and epochs.
CHUNK = 8


def _image_transform(preset: str, fill: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if preset == "light":
        return v2.Compose([
            v2.RandomAffine(degrees=4, translate=(0.03, 0.08), scale=(0.93, 1.03),
                            shear=(-6, 6, -3, 3), fill=fill),
            v2.ColorJitter(brightness=0.15, contrast=0.2),
        ])
    return v2.Compose([
        v2.RandomAffine(degrees=8, translate=(0.04, 0.12), scale=(0.85, 1.05),
                        shear=(-12, 12, -4, 4), fill=fill),
        v2.RandomPerspective(distortion_scale=0.2, p=0.5, fill=fill),
        v2.RandomApply([v2.ElasticTransform(alpha=12.0, sigma=3.0, fill=fill)], p=0.3),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 0.8))], p=0.2),
        v2.ColorJitter(brightness=0.3, contrast=0.3),
    ])


# SpecAugment masks per preset: (frequency masks, widest in mel bands,
# time masks, widest in frames). A spoken character spans 10-20 frames of 40 ms.
_AUDIO_MASKS = {"light": (1, 4, 2, 3), "strong": (2, 6, 3, 5)}


class Augment:
    """``Augment(preset, modality, fill)(x, seed)``: distort a (N, 1, H, W) uint8 batch.

    ``fill`` is the grey that moves in at the edges: a captcha's background (FILL), or
    0 for MNIST-style digits, white on black. Returns a new uint8 tensor of the same
    shape; ``x`` is not modified. The result is a function of (``x``, ``seed``) only.
    Raises ValueError for an unknown preset.
    """

    def __init__(self, preset: str, modality: str = "image", fill: int = FILL) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation {preset!r}: choose from {PRESETS}")
        self.preset = preset
        self.modality = modality
        self._image = (_image_transform(preset, fill)
                       if preset != "none" and modality == "image" else None)

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self.preset == "none" or len(x) == 0:
            return x.clone()
        if self.modality == "audio":
            return self._mask(x, torch.Generator().manual_seed(seed))
        assert self._image is not None
        threads = torch.get_num_threads()
        # v2 transforms draw from the global RNG: seed a private copy of it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # These are many small ops: with more than one intra-op thread they wait
            # on each other.
            torch.set_num_threads(1)
            try:
                return torch.cat([self._image(x[i : i + CHUNK])
                                  for i in range(0, len(x), CHUNK)])
            finally:
                torch.set_num_threads(threads)

    def _mask(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # torchaudio (FrequencyMasking, TimeMasking) is not a dependency; a mask is a
        # comparison against a random [start, start + width) per clip.
        n_freq, max_f, n_time, max_t = _AUDIO_MASKS[self.preset]
        n, _, h, w = x.shape
        out = x.clone()
        for size, count, widest, axis in ((h, n_freq, max_f, 2), (w, n_time, max_t, 3)):
            pos = torch.arange(size).view(1, size)  # (1, size)
            for _ in range(count):
                width = torch.randint(0, widest + 1, (n, 1), generator=gen)  # (N, 1)
                start = (torch.rand(n, 1, generator=gen) * (size - width + 1)).long()
                hit = (pos >= start) & (pos < start + width)  # (N, size)
                shape = (n, 1, size, 1) if axis == 2 else (n, 1, 1, size)
                out.masked_fill_(hit.view(shape), 0)  # 0: 80 dB below the loudest band
        return out
