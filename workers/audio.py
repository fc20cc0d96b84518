"""The audio front end: WAV bytes to a log-mel spectrogram the CNNs read as an image.

The spectrogram is stored as uint8 (0 = 80 dB below the clip's loudest band, 255 = the
loudest), so audio travels through the same loader, cache and normalization as grey
images. torchaudio is not a dependency: the mel filterbank is the HTK formula
(2595·log10(1 + f/700)) over ``torch.stft``, a dozen lines. Audio at another rate is
brought to the model's with scipy's polyphase resampler, which low-pass filters first.
"""

from __future__ import annotations

import io
import math
import wave
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import InputError

N_FFT = 640  # 80 ms at 8 kHz: twice the hop, so the frames overlap and miss nothing
RANGE_DB = 80.0  # levels from this many dB below the clip's loudest up to it
# captcha's AudioCaptcha: three beeps and two silences (0.9 s), then per character a
# voice of at most 0.8 s slowed by up to 1.2 and a pause of at most 3 s.
LEAD_SECONDS = 0.9
SECONDS_PER_CHAR = 4.0
MAX_SAMPLES = 8000 * 60  # one minute at 8 kHz: far above any captcha clip
MAX_RATE = 384_000  # Hz: the highest rate audio hardware records at
# The resampling ratio's denominator is held to this, so that an odd rate (44101 Hz,
# coprime with 8000) does not make a polyphase filter of 20 x 44101 taps; the ratio
# is then off by under 1/1000 (17 ms over a 4-character clip, under half a hop).
MAX_RATIO_TERMS = 1000


def clip_frames(length: int, sample_rate: int, hop: int) -> int:
    """Frames that hold the longest clip of ``length`` characters."""
    return math.ceil((LEAD_SECONDS + SECONDS_PER_CHAR * length) * sample_rate / hop)


def read_wav(data: bytes, name: str = "clip") -> tuple[torch.Tensor, int]:
    """Decode PCM WAV bytes to (mono float samples in [-1, 1], sample rate).

    Raises InputError naming ``name`` for anything that is not a readable PCM WAV.
    """
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate, n = (w.getnchannels(), w.getsampwidth(),
                                        w.getframerate(), w.getnframes())
            if n > MAX_SAMPLES * 8:
                raise InputError(f"{name}: {n} samples is beyond the one-minute limit")
            raw = w.readframes(n)
    except InputError:
        raise
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{name}: not a readable WAV file ({exc})") from exc
    if width not in (1, 2) or channels < 1 or not 1000 <= rate <= MAX_RATE:
        raise InputError(f"{name}: {8 * width}-bit, {channels}-channel, {rate} Hz WAV is "
                         "not supported (8 or 16-bit PCM, 1-384 kHz)")
    usable = len(raw) - len(raw) % (width * channels)
    if usable == 0:
        raise InputError(f"{name}: WAV holds no samples")
    buf = bytearray(raw[:usable])
    if width == 1:  # unsigned 8-bit, silence at 128
        x = (torch.frombuffer(buf, dtype=torch.uint8).float() - 128.0) / 128.0
    else:
        x = torch.frombuffer(buf, dtype=torch.int16).float() / 32768.0
    return x.view(-1, channels).mean(1), rate


def resample(samples: torch.Tensor, rate: int, sample_rate: int) -> torch.Tensor:
    """Mono samples at ``rate`` -> the same sound at ``sample_rate``.

    scipy's ``resample_poly`` low-pass filters below the lower Nyquist frequency first:
    linear interpolation (``F.interpolate``, used before) folds a 44.1 kHz clip's
    4-22 kHz content into the 0-4 kHz band the model reads.
    """
    if rate == sample_rate:
        return samples
    from scipy.signal import resample_poly  # imported here: only other rates need it

    ratio = Fraction(sample_rate, rate).limit_denominator(MAX_RATIO_TERMS)
    out = resample_poly(samples.numpy(), ratio.numerator, ratio.denominator)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


@lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, sample_rate: int, n_fft: int = N_FFT) -> torch.Tensor:
    """(n_mels, n_fft//2 + 1) triangular filters, evenly spaced on the mel scale."""
    def mel(f: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def hz(m: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(torch.linspace(0.0, float(mel(torch.tensor(sample_rate / 2))), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lower) / (centre - lower)
    down = (upper - freqs) / (upper - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def log_mel(samples: torch.Tensor, rate: int, sample_rate: int, n_mels: int, hop: int,
            frames: int, n_fft: int = N_FFT) -> torch.Tensor:
    """Mono samples -> (1, n_mels, frames) uint8 log-mel, low bands at the bottom row.

    Audio at another rate is resampled to ``sample_rate`` first (``resample``). A clip
    is cut or padded with silence to ``frames``.
    """
    samples = resample(samples, rate, sample_rate)
    if len(samples) < n_fft:  # a clip shorter than one window: silence after it
        samples = F.pad(samples, (0, n_fft - len(samples)))
    spec = torch.stft(samples, n_fft, hop_length=hop, window=torch.hann_window(n_fft),
                      center=True, return_complex=True).abs() ** 2  # (F, T)
    db = 10.0 * torch.log10(mel_filterbank(n_mels, sample_rate, n_fft) @ spec + 1e-10)
    # Relative to the clip's loudest band and frame, so the level a clip was recorded
    # at does not matter. (Levels above each band's median floor were tried: on clean
    # clips, with a floor of digital silence, every voice saturated to white.)
    db = torch.clamp(db - db.max(), min=-RANGE_DB)
    img = ((db + RANGE_DB) * (255.0 / RANGE_DB)).round().to(torch.uint8).flip(0)
    out = torch.zeros(1, n_mels, frames, dtype=torch.uint8)
    t = min(frames, img.shape[1])
    out[0, :, :t] = img[:, :t]
    return out
