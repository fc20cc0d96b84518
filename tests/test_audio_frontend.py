"""The audio front end's resampling: a clip at another rate reads as it would at the
model's 8 kHz, and sound above 4 kHz stays out of the band instead of folding into it.

The foil in each test is linear interpolation (``F.interpolate``), what the front end
used before; it is computed here to show the figure the test guards against.
"""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captcha.audio import AudioCaptcha
from scipy.signal import resample_poly

from shared.errors import InputError
from workers.audio import N_FFT, clip_frames, log_mel, read_wav

RATE, MELS, HOP = 8000, 32, 320  # the audio models' input: AUDIO_MELS, AUDIO_HOP


def _wav16(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype("<i2")
                      .tobytes())
    return buf.getvalue()


def _model_input(data: bytes, frames: int) -> torch.Tensor:
    """What the loader and predict make of WAV bytes (``wav_to_model_input``)."""
    samples, rate = read_wav(data)
    return log_mel(samples, rate, RATE, MELS, HOP, frames, N_FFT)


def _interpolated(data: bytes, frames: int) -> torch.Tensor:
    """The old front end: linear interpolation to 8 kHz, no filter."""
    samples, rate = read_wav(data)
    n = max(1, round(len(samples) * RATE / rate))
    samples = F.interpolate(samples[None, None], size=n, mode="linear",
                            align_corners=False)[0, 0]
    return log_mel(samples, RATE, RATE, MELS, HOP, frames, N_FFT)


def _mean_levels_apart(a: torch.Tensor, b: torch.Tensor, frames: int) -> float:
    return float((a.float() - b.float())[0, :, :frames].abs().mean())


def test_a_44_1_khz_clip_reads_as_its_8_khz_version():
    clip = bytes(AudioCaptcha().generate("1234"))
    with wave.open(io.BytesIO(clip)) as w:
        assert (w.getframerate(), w.getnchannels()) == (8000, 1)
    samples, _ = read_wav(clip)
    frames, used = clip_frames(4, RATE, HOP), len(samples) // HOP
    at_8k = _model_input(clip, frames)
    # The same sound at 44.1 kHz (441/80 = 44100/8000), then with a 10 kHz whistle a
    # recording at that rate may hold and an 8 kHz one cannot.
    high = resample_poly(samples.numpy().astype(np.float64), 441, 80)
    whistle = 0.1 * np.sin(2 * np.pi * 10_000 * np.arange(len(high)) / 44_100)
    for x in (high, (high + whistle) / max(1.0, float(np.abs(high + whistle).max()))):
        data = _wav16(x, 44_100)
        new = _mean_levels_apart(at_8k, _model_input(data, frames), used)
        old = _mean_levels_apart(at_8k, _interpolated(data, frames), used)
        print(f"\n44.1 kHz vs 8 kHz, mean |uint8 levels| apart: resample_poly {new:.2f}, "
              f"interpolate {old:.2f}")
        assert new < 1.0 and new < old  # measured: 0.37-0.40; interpolate 0.57-0.63, 7.3


@pytest.mark.parametrize("tone_hz", [6_000, 10_000, 15_000])
def test_a_tone_above_4_khz_at_44_1_khz_stays_out_of_the_8_khz_band(tone_hz):
    # The spectrogram is levelled to the clip's loudest band, so a tone alone would
    # always read 255. A 500 Hz tone of the same amplitude is the reference: with the
    # high tone filtered out, every other band stays near the floor (0 = 80 dB down).
    # resample_poly's default filter (Kaiser, beta 5) leaves what it lets through at
    # least 65 dB down from 6 kHz on: 4-5.5 kHz is its transition band.
    t = np.arange(44_100) / 44_100
    x = 0.4 * np.sin(2 * np.pi * 500 * t) + 0.4 * np.sin(2 * np.pi * tone_hz * t)
    data = _wav16(x, 44_100)
    at_8k = 0.4 * np.sin(2 * np.pi * 500 * np.arange(8000) / 8000)
    reference = _model_input(_wav16(at_8k, 8000), 25)[0, :, 2:-2]
    lit = reference.amax(1) > 0  # the 500 Hz bands
    assert 1 <= int(lit.sum()) <= 3
    new = _model_input(data, 25)[0, :, 2:-2]  # frames clear of the clip's two edges
    old = _interpolated(data, 25)[0, :, 2:-2]
    print(f"\n{tone_hz} Hz: loudest other band, resample_poly {int(new[~lit].max())}, "
          f"interpolate {int(old[~lit].max())} (of 255)")
    assert int(new[~lit].max()) <= 48  # measured: 32, 7, 0 (levels of 255 over 80 dB)
    assert int(old[~lit].max()) >= 200  # the alias interpolation folds in: 243-252
    assert (new[lit].float() - reference[lit].float()).abs().max() <= 2


@pytest.mark.parametrize("rate", [11_025, 16_000, 22_050, 44_101, 48_000, 96_000, 384_000])
def test_any_usable_rate_is_brought_to_8_khz_at_the_same_length(rate):
    t = np.arange(rate // 2) / rate  # half a second
    samples, got = read_wav(_wav16(0.5 * np.sin(2 * np.pi * 440 * t), rate))
    spec = log_mel(samples, got, RATE, MELS, HOP, 20, N_FFT)
    lit = (spec[0] > 0).any(0).nonzero().flatten()
    assert int(lit.max()) in (12, 13)  # 0.5 s = 12.5 hops; the last window spills over


def test_a_one_sample_clip_at_44_1_khz_is_read_as_silence_padded():
    samples, rate = read_wav(_wav16(np.array([0.5]), 44_100))
    spec = log_mel(samples, rate, RATE, MELS, HOP, 10, N_FFT)
    assert spec.shape == (1, MELS, 10) and spec[0, :, 3:].max() == 0


@pytest.mark.parametrize("rate", [999, 384_001, 2**31 - 1])
def test_a_rate_outside_1_to_384_khz_is_refused_by_name(rate):
    with pytest.raises(InputError, match=rf"odd\.wav: 16-bit, 1-channel, {rate} Hz WAV"):
        read_wav(_wav16(np.zeros(100), rate), "odd.wav")
