"""Training-time augmentation: what it changes, what it keeps, and its seeding."""

from __future__ import annotations

import random

import pytest
import torch

from shared import shardfmt
from workers.augment import Augment
from workers.codecs import decode_shard
from workers.loader import ShardLoader
from workers.models import ModelConfig
from workers.synth import render_items

CFG = ModelConfig(charset="0123456789", length=4, in_height=30, in_width=80,
                  image_height=60, image_width=160)
AUDIO_CFG = ModelConfig(charset="0123456789", length=4, in_height=32, in_width=100,
                        image_height=0, image_width=0, modality="audio")


@pytest.fixture(scope="module")
def captchas() -> torch.Tensor:
    """(24, 1, 30, 80) uint8: real captchas, rendered and decoded as training does."""
    items = render_items(7, 0, 24, CFG.charset, 4, 160, 60)
    x, _ = decode_shard(shardfmt.pack(items, {}), CFG)
    return x


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_augmentation_changes_images_and_keeps_their_shape_and_dtype(captchas, preset):
    before = captchas.clone()
    out = Augment(preset)(captchas, seed=3)
    assert out.shape == captchas.shape and out.dtype == torch.uint8
    assert torch.equal(captchas, before)  # the input is left alone
    changed = (out != captchas).flatten(1).any(1)
    assert changed.all()  # every image, not just some
    # Distorted, not wiped out: each image keeps ink on a background.
    assert (out.float().flatten(1).std(1) > 10).all()
    if preset == "light":
        assert (out.float() - captchas.float()).abs().mean() < 30


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_the_same_seed_gives_the_same_distortions_and_another_seed_others(captchas, preset):
    aug = Augment(preset)
    first = aug(captchas, seed=11)
    torch.rand(100)  # global RNG use in between must not matter
    assert torch.equal(aug(captchas, seed=11), first)
    assert torch.equal(Augment(preset)(captchas, seed=11), first)  # a fresh instance too
    assert not torch.equal(aug(captchas, seed=12), first)


def test_augmentation_leaves_the_global_rng_and_thread_count_as_they_were(captchas):
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Augment("strong")(captchas, seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_none_is_the_identity(captchas):
    assert torch.equal(Augment("none")(captchas, seed=1), captchas)


def test_audio_is_masked_in_bands_and_spans_not_warped():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 1, 32, 100), dtype=torch.uint8, generator=g)
    out = Augment("strong", "audio")(x, seed=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    kept = out == x
    zeroed = out == 0
    assert (kept | zeroed).all()  # every pixel is either untouched or silenced
    assert zeroed.any()
    # A silenced pixel lies in a whole silenced row (mel band) or column (frames).
    rows = zeroed.all(3, keepdim=True)
    cols = zeroed.all(2, keepdim=True)
    assert (~zeroed | rows | cols).all()
    assert torch.equal(Augment("strong", "audio")(x, seed=4), out)
    assert not torch.equal(Augment("strong", "audio")(x, seed=5), out)


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation"):
        Augment("heavy")


def _shards(n_shards: int, per_shard: int) -> dict[str, bytes]:
    out = {}
    for i in range(n_shards):
        items = render_items(100 + i, i * per_shard, per_shard, CFG.charset, 4, 160, 60)
        out[f"sha-{i}"] = shardfmt.pack(items, {})
    return out


def test_the_train_loader_augments_as_a_function_of_seed_and_epoch():
    store = _shards(3, 20)

    def loader(augment: str, seed: int = 0) -> ShardLoader:
        return ShardLoader(list(store), store.__getitem__, CFG, 16, seed=seed, mix=2,
                           augment=augment)

    plain = list(loader("none").epoch(1))
    light = list(loader("light").epoch(1))
    assert [len(y) for _, y in light] == [len(y) for _, y in plain]
    for (xp, yp), (xl, yl) in zip(plain, light, strict=True):
        assert torch.equal(yp, yl)  # same order: augmentation only touches pixels
        assert not torch.equal(xp, xl)
    again = list(loader("light").epoch(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(light, again, strict=True))
    other_epoch = list(loader("light").epoch(2))
    assert not torch.equal(torch.cat([x for x, _ in other_epoch]).sort(0).values,
                           torch.cat([x for x, _ in light]).sort(0).values)
    random.seed(0)  # python's RNG is not what makes it reproducible either
    assert all(torch.equal(a[0], b[0]) for a, b in
               zip(light, loader("light").epoch(1), strict=True))


def test_digits_white_on_black_get_black_moved_in_at_the_edges():
    x = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 9:19, 11:17] = 255  # a stroke in the middle
    dark = Augment("strong", fill=0)(x, seed=2)
    light = Augment("strong")(x, seed=2)  # the captcha default: light grey comes in
    edges = torch.cat([dark[..., 0, :], dark[..., -1, :], dark[..., :, 0], dark[..., :, -1]])
    assert edges.float().mean() < 10
    assert light[..., 0, :].float().mean() > dark[..., 0, :].float().mean() + 50
