from __future__ import annotations

import random

import pytest
import torch

from shared.spec import CRNN_COLUMNS_PER_STEP, MIN_INPUT
from workers import checkpoint
from workers.codecs import decode_label, encode_label
from workers.loop import Hooks, fit
from workers.models import PAD, ModelConfig, build_model, decode, time_steps

CFG = ModelConfig(charset="0123456789", length=4, in_height=30, in_width=80,
                  image_height=60, image_width=160)


def test_multihead_cnn_gives_one_distribution_per_position():
    model = build_model(CFG)
    out = model(torch.zeros(5, 1, 30, 80))
    assert out.shape == (5, 4, 10)  # (B, L, C)
    cfg = ModelConfig(**{**CFG.to_dict(), "charset": "ABC", "length": 6})
    assert build_model(cfg)(torch.zeros(2, 1, 30, 80)).shape == (2, 6, 3)


def test_label_codec_round_trips_and_refuses_bad_labels():
    assert encode_label("0782", "0123456789", 4) == [0, 7, 8, 2]
    assert decode_label([0, 7, 8, 2], "0123456789") == "0782"
    for bad in ("078", "07a2"):
        with pytest.raises(ValueError):
            encode_label(bad, "0123456789", 4)


def test_a_checkpoint_round_trips_without_pickle():
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 30, 80)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
             "rng": torch.get_rng_state(), "py": random.getstate(), "config": CFG.to_dict()}
    blob = checkpoint.dumps(state)
    assert b"\x80\x04" not in blob[:64]  # not a pickle protocol header
    back = checkpoint.loads(blob)
    assert back["epoch"] == 3 and back["config"] == CFG.to_dict()
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.AdamW(build_model(CFG).parameters())
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["param_groups"][0]["lr"] == opt.state_dict()["param_groups"][0]["lr"]


def test_garbage_is_not_a_checkpoint():
    from shared.errors import ArtifactError

    with pytest.raises(ArtifactError):
        checkpoint.loads(b"\x00" * 100)


class _Loader:
    def __init__(self, x, y, bs=16):
        self.x, self.y, self.bs = x, y, bs

    def epoch(self, e):
        for i in range(0, len(self.x), self.bs):
            yield self.x[i : i + self.bs], self.y[i : i + self.bs]

    def steps_per_epoch(self):
        return -(-len(self.x) // self.bs) + 1  # as a ShardLoader of one shard group


class _Record(Hooks):
    """Keeps each epoch's checkpoint (through the safetensors codec, as a run
    stores it); stops when ``stop()`` says so, keeping the interrupt's checkpoint."""

    def __init__(self, stop=None):
        self.epochs: dict[int, dict] = {}
        self.saved: list[dict] = []
        self.stop = stop

    def should_stop(self):
        return self.stop is not None and self.stop()

    def on_epoch(self, epoch, train, val, ckpt):
        self.epochs[epoch] = checkpoint.loads(checkpoint.dumps(ckpt))

    def on_interrupt(self, ckpt):
        self.saved.append(checkpoint.loads(checkpoint.dumps(ckpt)))


def test_resuming_from_a_checkpoint_matches_an_uninterrupted_run():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 30, 80), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64, 4), generator=g)
    loader = _Loader(x, y)
    kw = dict(train=loader, val=loader, test=loader, epochs=3, lr=1e-3, seed=1,
              device=torch.device("cpu"))
    record = _Record()
    full = fit(CFG, hooks=record, **kw)
    resumed = fit(CFG, resume=record.epochs[2], **kw)
    assert resumed.resumed_from == 2
    for k, v in full.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k


def test_a_run_stopped_mid_epoch_resumes_at_that_batch_with_the_same_result():
    from shared.errors import StopRequested

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (96, 1, 30, 80), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (96, 4), generator=g)
    loader = _Loader(x, y)
    kw = dict(train=loader, val=loader, test=loader, epochs=2, lr=1e-3, seed=2,
              device=torch.device("cpu"))
    full = fit(CFG, **kw)
    asked = {"n": 0}

    def stop_after_8_batches() -> bool:
        asked["n"] += 1
        return asked["n"] > 8  # epoch 1 has 6 batches: stop inside epoch 2

    record = _Record(stop=stop_after_8_batches)
    with pytest.raises(StopRequested):
        fit(CFG, hooks=record, **kw)
    saved = record.saved
    assert (saved[0]["epoch"], saved[0]["batch"]) == (1, 2)
    resumed = fit(CFG, resume=saved[0], **kw)
    for k, v in full.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k


CTC_CFG = ModelConfig(charset="0123456789", length=6, min_length=4, in_height=30,
                      in_width=80, image_height=60, image_width=160, arch="crnn")


def test_lenet_and_crnn_give_their_output_shapes():
    lenet = ModelConfig(charset="0123456789", length=1, in_height=28, in_width=28,
                        image_height=28, image_width=28, arch="lenet")
    assert build_model(lenet)(torch.zeros(3, 1, 28, 28)).shape == (3, 1, 10)  # (B, L, C)
    out = build_model(CTC_CFG)(torch.zeros(2, 1, 30, 80))
    assert out.shape == (2, time_steps(CTC_CFG), 11)  # (B, T, C + blank)


@pytest.mark.parametrize("pool", [4, 8, 16])
def test_the_audio_crnn_convolves_mel_bands_along_time_to_its_step_count(pool):
    cfg = ModelConfig(charset="0123456789", length=4, in_height=32, in_width=423,
                      image_height=0, image_width=0, arch="crnn", modality="audio",
                      channels=8, time_pool=pool, trunk="1d")
    net = build_model(cfg)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert net(torch.zeros(2, 1, 32, 423)).shape == (2, time_steps(cfg), 11)
    assert time_steps(cfg) == 423 // pool


def test_a_stored_config_without_a_trunk_rebuilds_the_2d_crnn_it_was_trained_as():
    stored = CTC_CFG.to_dict()
    del stored["trunk"]  # configs saved before the 1d trunk existed
    net = build_model(ModelConfig.from_dict(stored))
    assert any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert set(net.state_dict()) == set(build_model(CTC_CFG).state_dict())


def test_variable_length_labels_pad_and_refuse_lengths_outside_the_range():
    assert encode_label("0782", "0123456789", 6, 4) == [0, 7, 8, 2, PAD, PAD]
    assert decode_label([0, 7, 8, 2, PAD, PAD], "0123456789") == "0782"
    for bad in ("078", "0782345"):
        with pytest.raises(ValueError, match="4 to 6 characters"):
            encode_label(bad, "0123456789", 6, 4)


def test_greedy_ctc_decoding_collapses_repeats_and_drops_blanks():
    # steps: blank 3 3 blank 3 5 blank -> "335" (a blank separates a doubled 3)
    path = [0, 4, 4, 0, 4, 6, 0]
    logits = torch.full((1, len(path), 11), -10.0)
    for t, cls in enumerate(path):
        logits[0, t, cls] = 10.0
    idx, conf = decode(logits, CTC_CFG)
    assert decode_label(idx[0].tolist(), "0123456789") == "335"
    assert 0.99 < float(conf[0]) <= 1.0


def test_a_crnn_learns_texts_of_mixed_length_from_synthetic_strokes():
    # Each digit d is drawn as a bar of height 3 + 2d in its own 10 px column: a task
    # a CTC model must read left to right, whatever the text's length.
    g = torch.Generator().manual_seed(0)
    n = 384
    x = torch.zeros(n, 1, 30, 80, dtype=torch.uint8)
    y = torch.full((n, 6), PAD)
    for i in range(n):
        k = int(torch.randint(4, 7, (1,), generator=g))
        digits = torch.randint(0, 10, (k,), generator=g)
        for j, d in enumerate(digits.tolist()):
            x[i, 0, 27 - (3 + 2 * d) : 27, 6 + 12 * j : 12 + 12 * j] = 255
        y[i, :k] = digits
    loader = _Loader(x, y, bs=32)
    result = fit(CTC_CFG, train=loader, val=loader, test=loader, epochs=12, lr=3e-3, seed=0,
                 device=torch.device("cpu"))
    print(f"\ncrnn on synthetic strokes: seq_acc {result.test['seq_acc']:.3f}")
    assert result.test["seq_acc"] > 0.9


@pytest.mark.parametrize("arch", sorted(MIN_INPUT))
def test_each_image_model_runs_at_its_minimum_input_and_not_below(arch):
    """``MIN_INPUT``, by which the scheduler refuses a train job, is each model's real
    limit: it builds and runs at the minimum, and fails one pixel below in either
    dimension."""
    min_h, min_w = MIN_INPUT[arch]

    def runs(h: int, w: int) -> bool:
        cfg = ModelConfig(charset="0123456789", length=1, arch=arch, in_height=h,
                          in_width=w, image_height=h, image_width=w)
        try:
            build_model(cfg).eval()(torch.zeros(2, 1, h, w))
        except (RuntimeError, ValueError):  # a pool to nothing; BatchNorm over one value
            return False
        return True

    assert runs(min_h, min_w)
    assert not runs(min_h - 1, min_w) and not runs(min_h, min_w - 1)


def test_an_image_crnn_gives_one_time_step_per_columns_per_step():
    cfg = ModelConfig(charset="0123456789", length=4, arch="crnn", in_height=30,
                      in_width=80, image_height=60, image_width=160)
    steps = build_model(cfg).eval()(torch.zeros(1, 1, 30, 80)).shape[1]
    assert steps == time_steps(cfg) == 80 // CRNN_COLUMNS_PER_STEP


def _strokes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 digits, each a bar of height 3 + 2d in its own column, with noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 1, 30, 80), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n, 4), generator=g)
    for i in range(n):
        for j, d in enumerate(y[i].tolist()):
            x[i, 0, 27 - (3 + 2 * d) : 27, 6 + 18 * j : 14 + 18 * j] = 255
    return x, y


@pytest.mark.timeout(900)  # bf16 is emulated, slowly, on a CPU without it in hardware
def test_bf16_reads_as_well_as_fp32_on_the_same_training():
    """The small version of the parity figure (BENCHMARKS.md has the demo's): the
    same model, data and seed in fp32 and in bf16 autocast reach the same
    whole-sequence accuracy on held-out items, within a few items of 300."""
    train, held = _strokes(512, 0), _strokes(300, 1)
    kw = dict(train=_Loader(*train, bs=32), val=_Loader(held[0][:50], held[1][:50], bs=50),
              test=_Loader(*held, bs=100), epochs=3, lr=3e-3, seed=0,
              device=torch.device("cpu"))
    fp32 = fit(CFG, precision="fp32", **kw).test["seq_acc"]
    bf16 = fit(CFG, precision="bf16", **kw).test["seq_acc"]
    print(f"\nheld-out seq_acc: fp32 {fp32:.4f}, bf16 {bf16:.4f}")
    assert fp32 > 0.9 and bf16 > 0.9
    assert abs(fp32 - bf16) <= 0.02
